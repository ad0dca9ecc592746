"""SPEAR's loss terms as pure functions of tensors: likelihood on wins, tail unlikelihood on losses, anchor.

All per-token tensors are aligned to *targets*: position t holds the log-probability the model gave
to token t of the sequence, and the masks say which of those targets count. B = sequences, T = tokens.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token.  logits [B, T, V], targets [B, T] -> [B, T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def likelihood_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the masked tokens.  logprobs [B, T], mask [B, T] -> []."""
    mask = mask.to(logprobs.dtype)
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1.0)


def unlikelihood_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, confidence: torch.Tensor, margin: float
) -> torch.Tensor:
    """Confidence-weighted tail unlikelihood.  logprobs [B, T], mask [B, T], confidence [B] -> [].

    Each masked token whose probability p exceeds `margin` costs -log(1 - p); a sequence's cost is the
    mean over its masked tokens, weighted by that sequence's own confidence; sequences are averaged.
    Tokens the model already finds unlikely (p <= margin) cost nothing, so mass is not pushed forever.
    """
    mask = mask.to(logprobs.dtype)
    # log(1 - p) = log(-expm1(log p)), accurate when p is close to 1; keep p < 1 so the log stays finite.
    log_one_minus_p = torch.log(-torch.expm1(logprobs.clamp(max=-1e-6)))  # [B, T]
    above_margin = (logprobs.exp() > margin).to(logprobs.dtype)  # [B, T]
    per_token = -log_one_minus_p * above_margin * mask  # [B, T]
    per_sequence = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B]
    return (confidence.to(logprobs.dtype) * per_sequence).mean()


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
    completion_mask: torch.Tensor, targets: torch.Tensor, protected: torch.Tensor, num_tail_tokens: int, eos_id: int
) -> torch.Tensor:
    """The tokens unlikelihood may push down: the tail of each completion, less EOS and protected tokens.

    completion_mask, protected [B, T] bool; targets [B, T] token ids -> [B, T] bool.
    EOS and the answer marker appear in right and wrong answers alike: pushing them down would teach the
    model to stop ending its answers or to drop the format, not to avoid the wrong content.
    """
    return tail_mask(completion_mask, num_tail_tokens) & (targets != eos_id) & ~protected
