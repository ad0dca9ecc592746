"""SPEAR's loss terms as pure functions of tensors: likelihood on wins, tail unlikelihood on losses, anchor.

All per-token tensors are aligned to *targets*: position t holds the log-probability the model gave
to token t of the sequence, and the masks say which of those targets count. B = sequences, T = tokens.
"""

from __future__ import annotations

import math

import torch

from spearfl.losses.common import masked_mean


def likelihood_loss(logprobs: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Mean negative log-likelihood over the masked tokens (or `count` of them: `masked_mean`).  logprobs [B, T], mask [B, T] bool -> []."""
    return -masked_mean(logprobs, mask, count)


def unlikelihood_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, confidence: torch.Tensor, margin: float, num_sequences: int | None = None
) -> torch.Tensor:
    """Confidence-weighted tail unlikelihood.  logprobs [B, T], mask [B, T], confidence [B] -> [].

    Each masked token whose probability p exceeds `margin` costs -log(1 - p); a sequence's cost is the
    mean over its masked tokens, weighted by that sequence's own confidence; the average runs over the
    sequences that have masked tokens (one made only of format tokens would otherwise dilute the rest).
    Tokens the model already finds unlikely (p <= margin) cost nothing, so mass is not pushed forever.
    num_sequences: average over this many sequences instead (the whole step's, for one micro-batch of it).
    """
    mask = mask.to(logprobs.dtype)
    log_one_minus_p = log_one_minus_exp(logprobs.clamp(max=-1e-6))  # [B, T]; p < 1 keeps it finite
    above_margin = (logprobs.exp() > margin).to(logprobs.dtype)  # [B, T]
    per_token = -log_one_minus_p * above_margin * mask  # [B, T]
    num_masked = mask.sum(dim=1)  # [B]
    per_sequence = per_token.sum(dim=1) / num_masked.clamp(min=1.0)  # [B]
    if num_sequences is None:
        num_sequences = int((num_masked > 0).sum())
    return (confidence.to(logprobs.dtype) * per_sequence).sum() / max(num_sequences, 1)


def log_one_minus_exp(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p, accurate for p near 0 (log1p) and near 1 (expm1) alike."""
    small = logprobs < -math.log(2.0)
    return torch.where(small, torch.log1p(-logprobs.exp()), torch.log(-torch.expm1(logprobs)))


def anchor_loss(parameters: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Squared distance ||theta - theta_global||^2 summed over the named parameters."""
    total = torch.zeros((), device=next(iter(parameters.values())).device)
    for name, value in parameters.items():
        total = total + (value - reference[name].to(value.device)).pow(2).sum()
    return total


def tail_mask(completion_mask: torch.Tensor, num_tail_tokens: int) -> torch.Tensor:
    """Keep only each row's last `num_tail_tokens` completion tokens.  completion_mask [B, T] bool -> [B, T] bool."""
    position_from_end = completion_mask.flip(-1).long().cumsum(-1).flip(-1)  # [B, T], 1 at the last token
    return completion_mask & (position_from_end <= num_tail_tokens)


def unlikelihood_mask(
    completion_mask: torch.Tensor, targets: torch.Tensor, protected: torch.Tensor, num_tail_tokens: int, end_ids: torch.Tensor
) -> torch.Tensor:
    """The tokens unlikelihood may push down: the tail of each completion, less end-of-turn and protected tokens.

    completion_mask, protected [B, T] bool; targets [B, T] token ids; end_ids [E] every id that ends a
    turn (chat models have several) -> [B, T] bool.
    EOS and the answer marker appear in right and wrong answers alike: pushing them down would teach the
    model to stop ending its answers or to drop the format, not to avoid the wrong content.
    """
    return tail_mask(completion_mask, num_tail_tokens) & ~torch.isin(targets, end_ids) & ~protected
