"""Whether an update reached the model: two diagnostics of every step, for runs that seem not to learn.

- `relative_update`: ‖θ_after − θ_before‖ / ‖θ_before‖ over the trained parameters (with LoRA the adapter's).
  Adam moves each weight by about the learning rate a step, so this is roughly lr / typical |θ|.
- `sampler_share_changed`: the share of the sampling model's weights, in the dtype it samples with, that
  the step changed. Full fine-tuning keeps float32 master weights and samples from a bfloat16 copy on a
  GPU: a bfloat16 weight w only moves once the float32 one has moved by half its spacing (2^(e−8) where
  2^e ≤ |w| < 2^(e+1): between 2⁻⁹·|w| and 2⁻⁸·|w|; 6.1e-5 from |w| = 2⁻⁶ = 0.016 up to 2⁻⁵), so at lr 1e-6
  most updates never reach the rollouts. In float32 the sampler is the student itself and the share is
  simply the share of weights that moved. With LoRA the sampler applies
  the adapter unmerged (trainer/lora.py); the share is then that of the merged weights W + s·B·A in the
  base's dtype (the adapted linear layers only): what a merged bfloat16 sampler would see. Pass the
  student (the peft model) as `sampler` then.
"""

from __future__ import annotations

import math

import torch

from trainer.lora import adapted_layers


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of the trained parameters, taken before the optimizer step."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def relative_update(model, before: dict[str, torch.Tensor]) -> float:
    params = dict(model.named_parameters())
    # summed on the device, read back once (not once per parameter tensor: a host sync each on a GPU)
    moved = torch.stack([(params[name].float() - old.float()).square().sum() for name, old in before.items()]).sum()
    size = torch.stack([old.float().square().sum() for old in before.values()]).sum()
    moved, size = torch.stack([moved, size]).tolist()
    return math.sqrt(moved / size) if size else math.nan


@torch.no_grad()
def sampler_share_changed(sampler, before: dict[str, torch.Tensor], lora: bool) -> float:
    """Share of the sampler's weights changed by the step; `before` is the `snapshot` of the student taken
    before it (with full fine-tuning the sampler held those weights rounded to its own dtype)."""
    changed, total = [], 0  # counts kept on the device and read back once
    if not lora:
        for name, p in sampler.named_parameters():
            changed.append((p != before[name].to(p.dtype)).sum())
            total += p.numel()
    else:
        for name, layer in adapted_layers(sampler):
            weight, scale = layer.base_layer.weight, layer.scaling["default"]
            new = layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
            old = before[f"{name}.lora_B.default.weight"].float() @ before[f"{name}.lora_A.default.weight"].float()
            changed.append(((weight.float() + scale * new).to(weight.dtype) != (weight.float() + scale * old).to(weight.dtype)).sum())
            total += weight.numel()
    return int(torch.stack(changed).sum()) / total if total else math.nan
