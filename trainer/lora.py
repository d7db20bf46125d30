"""LoRA for train_min.py, through the peft library (an optional extra, imported only when --lora-r > 0).

The paper trains Qwen3-4B/8B with LoRA. Then one copy of the base weights plays every role: the student is
the base model with a trainable adapter, the frozen teacher is the same model with the adapter switched
off (`adapter_off`), and the student samples its own rollouts. Checkpoints hold the adapter (and, beside
it, the optimizer state of the adapter only); `final/` holds the adapter and a merged model that plain
`from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings


def attach(base, cfg, checkpoint: str | None = None):
    """The student: `base` with a new adapter as configured, or with the adapter saved in `checkpoint`."""
    import peft

    with warnings.catch_warnings():  # peft asks transformers 5.2x for a renamed attribute: its warning, not ours
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        if checkpoint:
            return peft.PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
        config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_target_modules.split(","), task_type="CAUSAL_LM")
        return peft.get_peft_model(base, config)


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
    """path/adapter/: the adapter; path/: the merged model (base + adapter, the base's dtype) and tokenizer."""
    student.save_pretrained(os.path.join(path, "adapter"))
    merged = copy.deepcopy(student).merge_and_unload()  # a copy: the returned student keeps its adapter
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
