"""Small helpers of train_min.py for models and token grids: the LM head's weight, micro-batches, the
valid tokens of a batch back into its (B, T) grid, copying weights between two copies of a model, and the
parameters an optimizer trains."""

from __future__ import annotations

import torch


def lm_head(model) -> torch.Tensor:
    return model.get_output_embeddings().weight  # (V, D)


def micro_batches(batch_size: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, batch_size, size)]


def to_grid(mask, rows) -> torch.Tensor:
    """Values of the valid tokens (N,), in row-major order, back into a zero-padded (B, T) grid."""
    return torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device).masked_scatter(mask, rows)


@torch.no_grad()
def copy_weights(source, target) -> None:
    if source is not target:
        for t, s in zip(target.parameters(), source.parameters()):
            t.copy_(s)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
