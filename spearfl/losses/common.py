"""The masked mean every loss averages with: over the masked positions of the whole batch.

Every loss in spearfl averages over all masked (completion) tokens of a batch, so each trained token
counts the same whichever sequence it belongs to.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the masked entries, 0 when none is masked.  values [B, T], mask [B, T] bool -> []

    Unmasked entries are dropped, not multiplied by 0, so an infinite value at a padded position never leaks in.

    >>> masked_mean(torch.tensor([[1.0, 3.0], [float("inf"), 5.0]]), torch.tensor([[True, True], [False, True]])).item()
    3.0
    """
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1).to(values.dtype)
