"""trainer/updates.py: the two diagnostics of whether an update reached the model that samples, against
their definitions, and in a bfloat16 run where a small learning rate does not reach the sampler."""

import json

import pytest
import torch

import train_min
from trainer import updates
from trainer.offline_models import build_tiny_model, build_tiny_tokenizer

from test_trainer import TINY


def test_relative_update_is_the_norm_of_the_change_over_the_norm_before():
    model = torch.nn.Linear(3, 2)
    before = updates.snapshot(model)
    with torch.no_grad():
        model.weight.add_(0.5)
    expected = (0.5**2 * 6) ** 0.5 / torch.cat([before["weight"].flatten(), before["bias"]]).norm()
    assert updates.relative_update(model, before) == pytest.approx(float(expected))


def test_a_bf16_sampler_sees_only_the_changes_that_survive_its_rounding():
    """w = 1 has a bfloat16 spacing of 2⁻⁷: a float32 step of 2⁻¹⁰ rounds back to 1, one of 2⁻⁶ does not."""
    student = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
    sampler = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    before = updates.snapshot(student)
    with torch.no_grad():
        student.weight.add_(torch.tensor([[2**-10, 2**-10, 2**-10, 2**-6]]))
        sampler.weight.copy_(student.weight)
    assert updates.sampler_share_changed(sampler, before, lora=False) == 0.25
    assert updates.sampler_share_changed(student, before, lora=False) == 1.0, "in float32 every moved weight counts"


def test_with_lora_the_share_is_that_of_the_merged_weights_in_the_bases_dtype():
    peft = pytest.importorskip("peft", reason="the optional extra peft is not installed")
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(tokenizer, dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    before = updates.snapshot(model)
    assert all("lora_" in name for name in before), "only the adapter is trained"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight
    adapted = sum(m.base_layer.weight.numel() for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    shares = []
    for value in (1e-9, 1.0):  # an adapter update far below the bf16 spacing of the weights, and one far above
        with torch.no_grad():
            layer.lora_B["default"].weight.fill_(value)
        merged = (weight.float() + 2.0 * layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()).to(weight.dtype)
        shares.append(updates.sampler_share_changed(model, before, lora=True))
        assert shares[-1] == pytest.approx(int((merged != weight).sum()) / adapted)
    assert shares[0] < 0.01 * shares[1]


def test_a_bf16_run_shows_at_step_1_when_its_updates_do_not_reach_the_sampler(tmp_path):
    shares = {}
    for lr in ("1e-7", "1e-2"):
        train_min.main(TINY + ["--dtype", "bfloat16", "--steps", "1", "--eval-size", "0", "--lr", lr,
                               "--lr-schedule", "constant", "--no-save-model", "--output-dir", str(tmp_path / lr)])
        row = json.loads((tmp_path / lr / "metrics.jsonl").read_text().splitlines()[0])
        shares[lr] = row["sampler_changed"]
        assert 0 < row["update_rel"] < 1
    assert shares["1e-7"] < 0.05 < 0.5 < shares["1e-2"]


def test_a_float32_weight_between_bf16_numbers_counts_only_when_the_samplers_rounding_moves():
    """Master weights are seldom bfloat16 numbers: 1 + 2⁻¹⁰ is 1 to the sampler before a step of 2⁻¹² and
    after it, so that step changed nothing the sampler holds; a step of 2⁻⁶ moved it to 1 + 2⁻⁶."""
    student = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1 + 2**-10)
    sampler = torch.nn.Linear(2, 1, bias=False).to(torch.bfloat16)
    before = updates.snapshot(student)
    with torch.no_grad():
        student.weight.add_(torch.tensor([[2**-12, 2**-6]]))
        sampler.weight.copy_(student.weight)
    assert updates.sampler_share_changed(sampler, before, lora=False) == 0.5


def adapted_ones(b: float):
    """A bfloat16 tiny model with LoRA r = 2, α = 4 (s = 2) on q_proj: base weights and A all 1, B all `b`;
    the model and its adapted layers."""
    peft = pytest.importorskip("peft", reason="the optional extra peft is not installed")
    base = build_tiny_model(build_tiny_tokenizer(), dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    with torch.no_grad():
        for layer in layers:
            layer.base_layer.weight.fill_(1.0)
            layer.lora_A["default"].weight.fill_(1.0)
            layer.lora_B["default"].weight.fill_(b)
    return model, layers


def test_the_lora_share_scales_the_adapter_and_counts_a_step_of_a_as_one_of_b():
    """Weights 1 (bfloat16 spacing 2⁻⁷: a change under 2⁻⁸ rounds away), r = 2, s = α/r = 2, B = 2⁻¹²: A from
    1 to 6 in the first layer moves s·B·A from 2⁻¹⁰ to 6·2⁻¹⁰, past 2⁻⁸ (unscaled, 3·2⁻¹¹, it would not)."""
    model, layers = adapted_ones(b=2**-12)
    before = updates.snapshot(model)
    with torch.no_grad():
        layers[0].lora_A["default"].weight.fill_(6.0)
    total = sum(layer.base_layer.weight.numel() for layer in layers)
    assert updates.sampler_share_changed(model, before, lora=True) == layers[0].base_layer.weight.numel() / total


def test_the_lora_share_rounds_the_exact_merged_weight_once():
    """s·B·A = 2⁻⁸ + 2⁻¹⁷ on weights 1: the exact merged weight is past half a bfloat16 spacing (2⁻⁸) and rounds
    to 1 + 2⁻⁷, a change; s·B·A first rounded to bfloat16 (2⁻⁸) would make a tie that rounds back to 1."""
    model, layers = adapted_ones(b=0.0)
    before = updates.snapshot(model)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.fill_(2**-10 + 2**-19)  # s·(B·A) = 2·2·B
    merged = (1.0 + 2.0 * 2 * (2**-10 + 2**-19))  # exact in float64
    assert torch.tensor(merged, dtype=torch.bfloat16).item() == 1 + 2**-7
    assert updates.sampler_share_changed(model, before, lora=True) == 1.0


def test_a_lora_run_reports_the_share_of_its_merged_weights(tmp_path):
    """With LoRA the share is measured on the student (its adapted layers), not on the sampler, which holds none."""
    pytest.importorskip("peft", reason="the optional extra peft is not installed")
    train_min.main(TINY + ["--dtype", "bfloat16", "--steps", "1", "--eval-size", "0", "--lr", "1e-2", "--lora-r", "4",
                           "--lr-schedule", "constant", "--no-save-model", "--output-dir", str(tmp_path)])
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < row["sampler_changed"] <= 1 and 0 < row["update_rel"]
