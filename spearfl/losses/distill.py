"""Distillation loss terms as pure functions of tensors: token-level KL(teacher || student) over the vocabulary.

Per-token tensors are aligned to *targets*, as in `spearfl.losses.spear`: position t holds the distribution
that predicts token t of the completion. B = sequences, T = tokens, V = vocabulary.
"""

from __future__ import annotations

import torch

from spearfl.losses.common import masked_mean


def token_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at each position, summed over the vocabulary.  [B, T, V] twice -> [B, T]

    Tokens the teacher gives probability 0 contribute nothing (0 log 0 = 0), even where its log-probability
    is -inf, so they never turn the sum into NaN.
    """
    teacher_logprobs = teacher_logprobs.float()
    teacher_probs = teacher_logprobs.exp()  # [B, T, V]
    per_token = teacher_probs * (teacher_logprobs - student_logprobs.float())  # [B, T, V]
    return torch.where(teacher_probs > 0, per_token, 0.0).sum(dim=-1)


def distillation_loss(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) averaged over the masked (completion) tokens of the batch.

    teacher_logprobs [B, T, V] (log-softmax, constants: no gradient reaches the teacher), student_logits
    [B, T, V], mask [B, T] bool -> []. Every completion token weighs the same, so long completions weigh more.
    """
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)  # [B, T, V]
    kl = token_kl(teacher_logprobs.detach(), student_logprobs)  # [B, T]
    return masked_mean(kl, mask)
