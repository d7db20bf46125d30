"""The LoRA sampler (trainer/lora.py): the student's forward through fewer kernels, its base weights shared,
and an adapter too small to survive merging into bfloat16 weights still visible."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer import decoding, lora
from trainer.config import Config
from trainer.offline_models import build_tiny_model, build_tiny_tokenizer

pytest.importorskip("peft", reason="the optional extra peft is not installed")

IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])


def student(dtype=torch.float32):
    """The tiny model with a LoRA adapter (r 4) on every projection, B random (peft starts it at 0)."""
    model = lora.attach(build_tiny_model(build_tiny_tokenizer(), dtype=dtype), Config(lora_r=4, lora_alpha=8))
    randomize_adapter(model, seed=0)
    return model


@torch.no_grad()
def randomize_adapter(model, seed, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale)


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


@torch.no_grad()
def test_each_sampler_layer_is_the_naive_merge_in_float64():
    """Layer by layer (the whole model's logits pass through Qwen2's RMSNorm, which computes in float32 even in a
    float64 model): W x + b + (α/r)·B·A x, biases (q, k, v) random too, every adapted layer."""
    trained = student(torch.float64)
    for name, p in trained.named_parameters():
        if name.endswith("bias"):
            p.copy_(torch.randn_like(p))
    fast, layers = lora.sampler(trained), dict(lora.adapted_layers(trained.get_base_model()))
    x = torch.randn(3, 5, next(iter(layers.values())).in_features, dtype=torch.float64)
    checked = 0
    for name, module in fast.named_modules():
        if isinstance(module, lora.LowRankLinear):
            peft_layer = layers[name]
            w, b = peft_layer.base_layer.weight, peft_layer.base_layer.bias
            a, bb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
            xs = x[..., : w.shape[1]] if w.shape[1] <= x.shape[-1] else torch.randn(3, 5, w.shape[1], dtype=torch.float64)
            naive = xs @ (w + peft_layer.scaling["default"] * bb @ a).T + (0 if b is None else b)
            torch.testing.assert_close(module(xs), naive, rtol=1e-12, atol=1e-12)
            checked += 1
    assert checked == len(layers) == 2 * 7


def test_the_sampler_is_the_students_forward_in_float64_and_follows_it_after_refresh():
    trained = student(torch.float64)
    fast = lora.sampler(trained)
    torch.testing.assert_close(logits(fast), logits(trained), rtol=1e-12, atol=1e-12)
    randomize_adapter(trained, seed=1)  # an update
    assert not torch.allclose(logits(fast), logits(trained)), "a stale sampler differs (else this test proves nothing)"
    lora.refresh(trained, fast)
    torch.testing.assert_close(logits(fast), logits(trained), rtol=1e-12, atol=1e-12)
    tokenizer = build_tiny_tokenizer()
    mask = torch.ones_like(IDS)
    ours, theirs = (decoding.generate(m, IDS, mask, 12, eos_id=-1, pad_id=tokenizer.pad_token_id, greedy=True)
                    for m in (fast, trained))
    assert torch.equal(ours, theirs)


def test_the_sampler_shares_the_base_weights_and_holds_only_the_adapter_beside_them():
    trained = student()
    fast = lora.sampler(trained)
    base = {p.data_ptr() for name, p in trained.named_parameters() if "lora_" not in name}
    assert {p.data_ptr() for p in fast.parameters()} == base, "every weight of the sampler is the student's base"
    adapter = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    assert sum(b.numel() for name, b in fast.named_buffers() if name.endswith((".A", ".sB"))) == adapter
    assert not any(p.requires_grad for p in fast.parameters())
    assert not lora.is_adapted(fast), "a plain model: no adapter to switch off"


class CountKernels(TorchDispatchMode):
    """The ATen operations that compute something (views and metadata changes are not kernels)."""
    VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "unsqueeze", "alias", "detach",
             "as_strided", "reshape", "select", "permute", "split", "squeeze", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))


def kernels(model) -> int:
    with torch.no_grad(), CountKernels() as counter:
        model(input_ids=IDS[:, :1])  # one decode step's forward
    return counter.count


def test_the_sampler_adds_two_kernels_per_adapted_layer_where_peft_adds_more():
    trained = student(torch.bfloat16)
    base = build_tiny_model(build_tiny_tokenizer(), dtype=torch.bfloat16)
    adapted = len(lora.adapted_layers(trained.get_base_model()))
    assert adapted == 2 * 7, "all seven projections of both layers"
    assert kernels(lora.sampler(trained)) - kernels(base) == 2 * adapted
    assert kernels(trained) - kernels(base) >= 4 * adapted  # peft: casts, two matmuls, the scaling, the add


@torch.no_grad()
def test_an_adapter_that_merging_rounds_away_stays_visible_to_the_bf16_sampler():
    """Adapted weights of magnitude 0.25 to 0.5 (half a bfloat16 spacing there is 2⁻¹⁰ ≈ 1e-3) and s·B·A of
    about 1e-4: merged into the weights the adapter vanishes, unmerged it moves the sampler's logits."""
    trained = student(torch.bfloat16)
    generator = torch.Generator().manual_seed(3)
    for _, layer in lora.adapted_layers(trained.get_base_model()):
        weight = layer.base_layer.weight
        magnitude = 0.25 + 0.25 * torch.rand(weight.shape, generator=generator)
        weight.copy_(torch.where(torch.rand(weight.shape, generator=generator) < 0.5, -magnitude, magnitude))
    randomize_adapter(trained, seed=2, scale=0.005)
    with trained.disable_adapter():
        base = logits(trained)
    before = [p.clone() for p in trained.get_base_model().parameters() if not p.requires_grad]
    merged = copy.deepcopy(trained).merge_and_unload()
    assert all(torch.equal(a, b) for a, b in zip(merged.parameters(), before)), "merging rounds it all away"
    assert torch.equal(logits(merged), base)
    assert not torch.equal(logits(lora.sampler(trained)), base), "the sampler sees the adapter"


def test_a_lora_run_samples_every_step_from_the_adapter_as_last_updated(tmp_path, monkeypatch):
    import train_min
    from test_trainer import TINY

    students, seen = [], []
    attach, rollouts = lora.attach, train_min.rollouts
    monkeypatch.setattr(lora, "attach", lambda *args, **kwargs: students.append(attach(*args, **kwargs)) or students[-1])

    def checked(sampler, *args):
        seen.append(logits(sampler) - logits(students[-1]))
        return rollouts(sampler, *args)

    monkeypatch.setattr(train_min, "rollouts", checked)
    train_min.main(TINY + ["--steps", "3", "--lora-r", "4", "--lr", "1e-3", "--eval-size", "0", "--output-dir", str(tmp_path)])
    assert len(seen) == 3 and all(d.abs().max() < 1e-5 for d in seen), [d.abs().max() for d in seen]
    with students[-1].disable_adapter():
        base = logits(students[-1])
    assert (logits(students[-1]) - base).abs().max() > 1e-3, "the adapter moved, so a stale sampler would differ"


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft's, of the tiny model's tied head
def test_an_adapter_on_the_lm_head_is_refused_where_the_config_could_not_be_checked_before_loading():
    """The log-probs read the head's weight directly (egrsd.linear_*): an adapter there would never train."""
    pytest.importorskip("peft", reason="the optional extra peft is not installed")
    cfg = Config(model="tiny", lora_r=4, lora_target_modules="q_proj,lm_head")
    with pytest.raises(SystemExit, match=r"^--lora-target-modules: expected no LM head"):
        lora.attach(build_tiny_model(build_tiny_tokenizer()), cfg)
    assert lora.attach(build_tiny_model(build_tiny_tokenizer()), Config(model="tiny", lora_r=4, lora_target_modules="q_proj"))


def test_attach_makes_the_configured_adapter_scaled_alpha_over_r_and_the_defaults_are_the_papers():
    """peft's adapter as configured (the sampler copies peft's own scaling, so a wrong α would pass every test
    that compares the sampler with the student); the defaults: α 128, dropout 0 on all seven projections."""
    defaults = Config()
    assert (defaults.lora_alpha, defaults.lora_dropout) == (128.0, 0.0)
    assert defaults.lora_target_modules.split(",") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = lora.attach(build_tiny_model(build_tiny_tokenizer()), Config(lora_r=4, lora_alpha=10, lora_dropout=0.25))
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 10, 0.25)
    layers = lora.adapted_layers(model.get_base_model())
    assert len(layers) == 2 * 7 and all(layer.scaling["default"] == 10 / 4 for _, layer in layers)


def test_adapter_parameters_counts_the_adapter_alone_r_times_in_plus_out_per_adapted_layer():
    tokenizer = build_tiny_tokenizer()
    cfg = Config(lora_r=4, lora_target_modules="q_proj,down_proj")
    linear = {name: m for name, m in build_tiny_model(tokenizer).named_modules() if name.endswith(("q_proj", "down_proj"))}
    assert lora.adapter_parameters(build_tiny_model(tokenizer), cfg) == sum(4 * (m.in_features + m.out_features) for m in linear.values())


@torch.no_grad()
def test_inside_adapter_off_the_student_is_the_base_model_and_the_teacher_scores_with_it():
    """The teacher is the base model alone: the same logits, and train_min.score's teacher log-probs, as the
    model before the adapter was attached."""
    import train_min

    trained, plain = student(torch.float64), build_tiny_model(build_tiny_tokenizer(), dtype=torch.float64)
    assert not torch.allclose(logits(trained), logits(plain)), "the adapter moves the logits (else this proves nothing)"
    with lora.adapter_off(trained):
        torch.testing.assert_close(logits(trained), logits(plain), rtol=0, atol=0)
    ones = torch.ones_like(IDS)
    batch = train_min.Rollouts(IDS, ones, IDS, ones, IDS[:, :3], torch.ones(2, 3, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    cfg = Config(model="tiny", device="cpu", micro_batch_size=2)
    got, expected = (train_min.score(None, m, batch, cfg).teacher_logp for m in (trained, plain))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft's, of the tiny model's tied embedding
def test_a_sampler_refuses_a_student_whose_adapter_it_could_not_apply():
    """An adapter on the embedding is trained but not a LowRankLinear: a sampler would silently drop it."""
    model = lora.attach(build_tiny_model(build_tiny_tokenizer()), Config(lora_r=4, lora_target_modules="q_proj,embed_tokens"))
    with pytest.raises(ValueError, match="expected LoRA on linear layers only"):
        lora.sampler(model)
