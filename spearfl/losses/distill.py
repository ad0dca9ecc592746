"""Distillation loss terms as pure functions of tensors: token-level divergences between a teacher's and a student's
next-token distributions over the vocabulary.

Three divergences, keyed by the names of `opsd.divergence` in DIVERGENCES, T the teacher and S the student:
forward_kl = KL(T || S), the teacher as the target (mode-covering); reverse_kl = KL(S || T) (mode-seeking);
jsd = the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv 2306.13649),
beta KL(T || M) + (1 - beta) KL(S || M) with M = beta T + (1 - beta) S, which lies between 0 and the entropy of
(beta, 1 - beta) (log 2 at beta 0.5, where it is symmetric in T and S).

Per-token tensors are aligned to *targets*, as in `spearfl.losses.spear`: position t holds the distribution
that predicts token t of the completion. B = sequences, T = tokens, V = vocabulary.
"""

from __future__ import annotations

import math

import torch

from spearfl.losses.common import at_least_float32, masked_mean


def token_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at each position, summed over the vocabulary.  [B, T, V] twice -> [B, T]

    Tokens p gives probability 0 contribute nothing (0 log 0 = 0), even where its log-probability is -inf,
    so they never turn the sum into NaN.
    """
    p_logprobs = at_least_float32(p_logprobs)
    p_probs = p_logprobs.exp()  # [B, T, V]
    per_token = p_probs * (p_logprobs - at_least_float32(q_logprobs))  # [B, T, V]
    return torch.where(p_probs > 0, per_token, 0.0).sum(dim=-1)


def token_reverse_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) at each position.  [B, T, V] twice -> [B, T]

    Infinite where the teacher rules out a token the student allows; a teacher from a softmax never does.
    """
    return token_kl(student_logprobs, teacher_logprobs)


def token_jsd(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S.  [B, T, V] twice -> [B, T]

    log M is a logsumexp of the weighted log-probabilities, so tiny probabilities never underflow; tokens the
    teacher (or the student) gives probability 0 contribute nothing to its own term, as in token_kl.
    """
    weighted = torch.stack([at_least_float32(teacher_logprobs) + math.log(beta), at_least_float32(student_logprobs) + math.log(1 - beta)])
    mixture_logprobs = torch.logsumexp(weighted, dim=0)  # [B, T, V]
    return beta * token_kl(teacher_logprobs, mixture_logprobs) + (1 - beta) * token_kl(student_logprobs, mixture_logprobs)


DIVERGENCES = {  # opsd.divergence -> (teacher log-probs, student log-probs, jsd beta) -> [B, T]
    "forward_kl": lambda teacher, student, beta: token_kl(teacher, student),
    "reverse_kl": lambda teacher, student, beta: token_reverse_kl(teacher, student),
    "jsd": token_jsd,
}


def distillation_loss(
    teacher_logprobs: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    count: int | None = None,
) -> torch.Tensor:
    """A DIVERGENCES entry between teacher and student, averaged over the masked (completion) tokens of the batch.

    teacher_logprobs [B, T, V] (log-softmax, constants: no gradient reaches the teacher), student_logits
    [B, T, V], mask [B, T] bool -> []. Every completion token weighs the same, so long completions weigh more.
    jsd_beta is used by "jsd" only; count: the tokens to average over (`masked_mean`), the masked ones by default.
    """
    student_logprobs = torch.log_softmax(at_least_float32(student_logits), dim=-1)  # [B, T, V]
    per_token = DIVERGENCES[divergence](teacher_logprobs.detach(), student_logprobs, jsd_beta)  # [B, T]
    return masked_mean(per_token, mask, count)


def tempered_distillation_loss(
    teacher_logprobs: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, temperature: float, num_sequences: int
) -> torch.Tensor:
    """T^2 KL(softmax(t / T) || softmax(s / T)) summed over the masked tokens and divided by `num_sequences`: the
    knowledge-distillation term of TAP's stage 2 (torch's kl_div with reduction "batchmean" over sequences).

    teacher_logprobs [B, T, V] (a log-softmax at temperature 1, constants), student_logits [B, T, V], mask [B, T]
    bool -> []. num_sequences: the step's sequences, when these rows are one micro-batch of it.
    """
    teacher = torch.log_softmax(at_least_float32(teacher_logprobs.detach()) / temperature, dim=-1)
    student = torch.log_softmax(at_least_float32(student_logits) / temperature, dim=-1)
    return tempered_batchmean(token_kl(teacher, student), mask, temperature, num_sequences)


def tempered_batchmean(per_token_kl: torch.Tensor, mask: torch.Tensor, temperature: float, num_sequences: int) -> torch.Tensor:
    """T^2 x the masked per-token KL(softmax(t / T) || softmax(s / T)) summed, over `num_sequences`: the reduction
    of `tempered_distillation_loss`, for KL terms formed elsewhere (`spearfl.lm.forward.chunked_distillation`).
    per_token_kl, mask [B, T] -> []"""
    return temperature**2 * torch.where(mask, per_token_kl, 0.0).sum() / max(num_sequences, 1)
