"""The masked mean every loss averages with: over the masked positions of the whole batch.

Every loss in spearfl averages over all masked (completion) tokens of a batch, so each trained token
counts the same whichever sequence it belongs to.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the masked entries, 0 when none is masked.  values [B, T], mask [B, T] bool -> []

    Unmasked entries are dropped, not multiplied by 0, so an infinite value at a padded position never leaks in.
    count: divide by this many entries instead of the masked ones here: the whole step's, when these rows are one
    micro-batch of it (`spearfl.lm.training.accumulate_gradients`), so the micro-batches' means add up to the step's.

    >>> masked_mean(torch.tensor([[1.0, 3.0], [float("inf"), 5.0]]), torch.tensor([[True, True], [False, True]])).item()
    3.0
    """
    total = torch.where(mask, values, 0.0).sum()
    count = mask.sum() if count is None else torch.as_tensor(count, device=values.device)
    return total / count.clamp(min=1).to(values.dtype)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16 and float16 widened to float32; float32 and float64 as they are (float64: the tests' reference)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
