"""Policy-gradient loss terms as pure functions of tensors: advantages, PPO clipping, a KL estimate, REINFORCE.

Used by the GRPO and RLTF-SD baselines. Per-token tensors are aligned to *targets*, as in
`spearfl.losses.spear`: position t holds the log-probability of completion token t, and `mask` says which
positions are completion tokens. B = sequences, T = token positions, P = prompts, G = samples per prompt.
Every loss averages over all masked tokens of the batch, as `spearfl.losses.common.masked_mean` does, so each
trained token counts the same whichever sequence it belongs to; `count`, where given, is the number of tokens to
divide by (the whole step's, when the rows are one micro-batch of it).
"""

from __future__ import annotations

import torch

from spearfl.losses.common import masked_mean

ADVANTAGE_EPSILON = 1e-4  # as TRL's GRPO; it bounds the advantages of a group with a tiny but non-zero spread


def group_advantages(rewards: torch.Tensor, epsilon: float = ADVANTAGE_EPSILON) -> torch.Tensor:
    """GRPO's advantage: each reward normalised within its group.  rewards [P, G] -> [P, G]

    (r - mean) / (std + epsilon), with the population std of the group, so a group's advantages have
    unit variance. A group whose samples all got the same reward gets zeros: it carries no signal.

    >>> group_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), epsilon=0.0).tolist()
    [[1.0, -1.0], [0.0, 0.0]]
    """
    mean = rewards.mean(dim=-1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=-1, keepdim=True, correction=0)  # [P, 1]
    return torch.where(std > 0, (rewards - mean) / (std + epsilon), torch.zeros_like(rewards))


def clipped_surrogate_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
    count: int | None = None,
) -> torch.Tensor:
    """Negated PPO clipped objective, per token.  logprobs, old_logprobs [B, T], advantages [B], mask [B, T] -> []

    Per token: min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon) A), ratio = exp(logprobs - old_logprobs).
    Where the clipped term is the smaller one, the token's term is a constant and sends no gradient:
    the policy is not pushed further from the one that sampled it.
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())  # [B, T]
    advantages = advantages.detach()[:, None]  # [B, 1]
    unclipped = ratio * advantages  # [B, T]
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * advantages  # [B, T]
    return -masked_mean(torch.minimum(unclipped, clipped), mask, count)


def clipped_fraction(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
    count: int | None = None,
) -> float:
    """Share of masked tokens whose clipped term is active (they send no gradient).  Same shapes as above."""
    ratio = torch.exp(logprobs.detach() - old_logprobs)  # [B, T]
    advantages = advantages[:, None]  # [B, 1]
    above = (ratio > 1.0 + epsilon) & (advantages > 0)
    below = (ratio < 1.0 - epsilon) & (advantages < 0)
    return float(masked_mean((above | below).float(), mask, count))


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """KL(policy || reference) by the k3 estimator on the policy's own samples.  [B, T], [B, T], [B, T] -> []

    Per token: exp(d) - d - 1 with d = reference - policy log-probability (Schulman, "Approximating KL
    divergence", 2020; the estimator DeepSeekMath's GRPO uses): non-negative, unbiased on samples of the
    policy, and 0 with zero gradient where the two agree.
    """
    difference = reference_logprobs.detach() - logprobs  # [B, T]
    return masked_mean(torch.exp(difference) - difference - 1.0, mask, count)


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Policy gradient: - advantage x log-probability, per token.  logprobs [B, T], advantages [B], mask [B, T] -> []

    A positive advantage raises its sequence's tokens, a negative one lowers them.
    """
    return -masked_mean(logprobs * advantages.detach()[:, None], mask, count)


def rltf_advantages(
    first_rewards: torch.Tensor, revision_rewards: torch.Tensor, discount: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RLTF-SD's three advantages per rollout, each against its group's baseline (Song et al. 2026, Algorithm 1).

    first_rewards [P, N]; revision_rewards [P, N], NaN where the episode ended after the first turn -> three [P, N]:
    - first turn: the return r0 + discount x r1 (r1 = 0 without a second turn) minus the group's mean return;
    - second turn: r1 minus the mean r1 of the group's revised rollouts;
    - distillation: r1 minus the group's mean first-turn reward (the paper's Eq. 7).
    The last two are 0 where there is no second turn.

    >>> first, second, distill = rltf_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[float("nan"), 1.0]]), 0.5)
    >>> first.tolist(), second.tolist(), distill.tolist()
    ([[0.25, -0.25]], [[0.0, 0.0]], [[0.0, 0.5]])
    """
    revised = ~torch.isnan(revision_rewards)  # [P, N]
    second_rewards = torch.where(revised, revision_rewards, 0.0)  # [P, N]
    returns = first_rewards + discount * second_rewards  # [P, N]
    first = returns - returns.mean(dim=-1, keepdim=True)
    second_baseline = second_rewards.sum(dim=-1, keepdim=True) / revised.sum(dim=-1, keepdim=True).clamp(min=1)  # [P, 1]
    second = torch.where(revised, second_rewards - second_baseline, 0.0)
    distill = torch.where(revised, second_rewards - first_rewards.mean(dim=-1, keepdim=True), 0.0)
    return first, second, distill
