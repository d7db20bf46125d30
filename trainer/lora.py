"""LoRA for train_min.py, through the peft library (an optional extra, imported only when --lora-r > 0).

The paper trains Qwen3-4B/8B with LoRA. Then one copy of the base weights plays every role: the student is
the base model with a trainable adapter, the frozen teacher is the same model with the adapter switched
off (`adapter_off`), and the student samples its own rollouts through `sampler`, which shares those base
weights. Checkpoints hold the adapter (and, beside it, the optimizer state of the adapter only); `final/`
holds the adapter and a merged model that plain `from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings

import torch


def attach(base, cfg, checkpoint: str | None = None):
    """The student: `base` with a new adapter as configured, or with the adapter saved in `checkpoint`."""
    import peft

    with warnings.catch_warnings():  # peft asks transformers 5.2x for a renamed attribute: its warning, not ours
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        if checkpoint:
            student = peft.PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
        else:
            config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                     target_modules=cfg.lora_target_modules.split(","), task_type="CAUSAL_LM")
            student = peft.get_peft_model(base, config)
    if hasattr(student.get_output_embeddings(), "base_layer"):  # (where config.check_lora_targets could not look)
        sys.exit("--lora-target-modules: expected no LM head (the log-probs read its weight directly, so an adapter "
                 "there would never train)")
    return student


def adapter_parameters(base, cfg) -> int:
    """How many parameters the adapter of `cfg` adds to `base` (a model on the meta device will do)."""
    return sum(p.numel() for p in attach(base, cfg).parameters() if p.requires_grad)


def is_adapted(model) -> bool:
    """Whether `model` is a peft model (its own teacher once the adapter is off)."""
    return hasattr(model, "peft_config")


def adapter_off(model):
    """Inside this block `model` is the teacher: the base model, adapter switched off (no-op for a plain model)."""
    return model.disable_adapter() if is_adapted(model) else contextlib.nullcontext()


def save_final(student, tokenizer, path: str) -> None:
    """path/adapter/: the adapter; path/: the merged model (base + adapter, rounded to the base's dtype: in bf16
    adapter changes below half a weight's spacing are lost there, not in path/adapter/) and tokenizer."""
    student.save_pretrained(os.path.join(path, "adapter"))
    merged = copy.deepcopy(student).merge_and_unload()  # a copy: the returned student keeps its adapter
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)


class LowRankLinear(torch.nn.Module):
    """A frozen linear layer and an unmerged low-rank update in the layer's own dtype, for sampling only:
    y = x Wᵀ + b + (x Aᵀ)(s·B)ᵀ, two kernels more than the layer alone (a matmul, and a matmul that adds into
    the layer's output), where peft's forward takes six (a cast of x to the float32 adapter, its two matmuls,
    the scaling, the add and the cast back). Unmerged, a small adapter stays visible in bfloat16:
    merged, W + s·B·A rounds every change below half a bfloat16 spacing of W away, for good; here the update
    is added to outputs that differ token by token, so the rounding is as often up as down."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base  # the student's layer itself: its weight is shared, not copied
        weight = base.weight
        self.register_buffer("A", torch.zeros(rank, weight.shape[1], dtype=weight.dtype, device=weight.device))
        self.register_buffer("sB", torch.zeros(weight.shape[0], rank, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        low = torch.nn.functional.linear(x, self.A)
        return torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), self.sB.t()).view(y.shape)


def adapted_layers(model):
    """(name, peft LoRA layer) of each layer of `model` that carries the default adapter (the one `attach`
    makes), names relative to `model`."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "base_layer") and "default" in module.lora_A]


def sampler(student):
    """The model that samples the student's rollouts and evaluations: the student's base model with every
    adapted layer a `LowRankLinear` over the same (shared) base weights, the adapter copied into the base's
    dtype. Call `refresh(student, sampler)` after each update. Its logits are the student's up to rounding
    (float64: equal to 1e-12, tested; float32: within about 1e-5; bf16: the adapter rounded to bf16); it
    holds no gradient and never trains. Its parameters ARE the student's: moving or casting the sampler
    (`.to`, `.cuda`, `.half`) moves or casts the student's base weights with it."""
    base = student.get_base_model()
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    model = copy.deepcopy(base, memo=shared)  # the modules copied, every weight shared
    model.__dict__.pop("peft_config", None)  # (peft marks the base model it wraps; the sampler is a plain model)
    for name, layer in adapted_layers(model):
        model.set_submodule(name, LowRankLinear(layer.base_layer, layer.lora_A["default"].weight.shape[0]))
    left = [name for name, p in model.named_parameters() if p.requires_grad]
    if left:  # an adapter this sampler does not know (on an embedding, say): it would share trained weights
        raise ValueError(f"student: expected LoRA on linear layers only, got a trainable {left[0]}")
    refresh(student, model)
    return model


@torch.no_grad()
def refresh(student, sampler) -> None:
    """Copy the student's adapter (A, and B times its scale α/r) into the sampler's layers."""
    layers = dict(adapted_layers(student.get_base_model()))
    for name, module in sampler.named_modules():
        if isinstance(module, LowRankLinear):
            layer = layers[name]
            module.A.copy_(layer.lora_A["default"].weight)
            module.sB.copy_(layer.lora_B["default"].weight * layer.scaling["default"])
