"""Small helpers of train_min.py for models and token grids: the LM head's weight, micro-batches of rows of
like length without the padding they all share, the valid tokens of a batch back into its (B, T) grid,
copying weights between two copies of a model, the parameters an optimizer trains, and gradient
checkpointing switched on where memory needs it."""

from __future__ import annotations

import torch

from trainer.offline_models import enable_activation_checkpointing


def lm_head(model) -> torch.Tensor:
    return model.get_output_embeddings().weight  # (V, D)


def micro_batches(mask, size: int) -> list[torch.Tensor]:
    """The rows of a batch (mask (B, T): its valid completion tokens) in micro-batches of `size` rows, the
    longest completions first: row indices (n,), every row once. Rows of like length share a micro-batch,
    so each pads to little more than its own rows (see without_shared_padding)."""
    return list(mask.sum(dim=1).argsort(descending=True, stable=True).split(size))


def without_shared_padding(prompt_ids, prompt_mask, completion, mask) -> tuple[torch.Tensor, ...]:
    """The rows' prompts and completions less the columns that are padding in every row: the prompts'
    leading ones, the completions' trailing ones. In a causal model those columns change nothing the rows
    compute; they only cost compute. Every column in which some row has a token is kept, so this holds for
    any padding; for left-padded prompts and masks True up to the EOS (as here) it leaves each micro-batch
    exactly as wide as its longest prompt and its longest completion."""
    in_prompt, in_completion = prompt_mask.bool().any(dim=0), mask.any(dim=0)
    stop = len(in_completion) - in_completion.flip(0).int().argmax()  # one past the last column with a token
    start, stop = torch.stack([in_prompt.int().argmax(), stop]).tolist()
    return prompt_ids[:, start:], prompt_mask[:, start:], completion[:, :stop], mask[:, :stop]


def in_batch_order(micro: list[torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    """One tensor (B, ...) in the batch's order from one part per micro-batch (`parts[i]` holds the rows
    `micro[i]`)."""
    rows = torch.cat(parts)
    out = torch.empty_like(rows)
    out[torch.cat(micro)] = rows
    return out


def to_grid(mask, rows) -> torch.Tensor:
    """Values of the valid tokens (N,), in row-major order, back into a zero-padded (B, T) grid."""
    return torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device).masked_scatter(mask, rows)


def rows_to_grid(mask, micro: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Values of the valid tokens of each micro-batch (`values[i]` (N_i,) for the rows `micro[i]`, row-major)
    into one zero-padded (B, T) grid in the batch's order."""
    return in_batch_order(micro, [to_grid(mask[rows], v) for rows, v in zip(micro, values)])


@torch.no_grad()
def copy_weights(source, target) -> None:
    if source is not target:
        for t, s in zip(target.parameters(), source.parameters()):
            t.copy_(s)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def checkpointing_if_needed(update, model, optimizer, may_switch: bool):
    """(update(), False); but if `update` runs out of device memory in its forward or backward and
    `may_switch`, switch activation checkpointing on for `model` and take the update again from the start:
    (update(), True). The gradients already accumulated are dropped and the random state is put back (dropout
    draws the same masks again), so the update taken again is the one a run with checkpointing on would take.
    Only torch.OutOfMemoryError is caught, and out of memory once `optimizer.step` has begun is raised: the
    step may have moved some state, and recomputing activations would not help. As accelerate's
    find_executable_batch_size retries a smaller batch: recomputation only where memory needs it."""
    stepping = []
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    hook = optimizer.register_step_pre_hook(lambda *args: stepping.append(True))
    try:
        return update(), False
    except torch.OutOfMemoryError:
        if not may_switch or stepping:
            raise
    finally:
        hook.remove()
    # (outside the except block: its traceback, which holds the failed update's tensors, is gone)
    optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
        torch.cuda.empty_cache()
    enable_activation_checkpointing(model)
    print("out of device memory without gradient checkpointing: on from now on, and this update taken again", flush=True)
    return update(), True
