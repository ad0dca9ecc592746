"""GRPO client update: group-relative policy optimisation (Shao et al., 2024, DeepSeekMath, arXiv 2402.03300).

One round on one client: sample G completions for each of n prompts from the round-start (global)
adapter, reward each 1 if the feedback provider's verdict is "correct" and 0 otherwise, normalise the
rewards within each prompt's group into advantages, then take `local_steps` optimizer steps on the
PPO clipped surrogate plus kl_coef x KL (k3 estimator) to the round-start adapter. The steps make
`grpo.passes` passes over all of the round's rollouts, each pass in shuffled minibatches, as GRPO and
PPO do: every sampled completion, whose generation is counted in full, is trained on in every pass. From
the second step on the policy has moved, so the ratio new / old policy departs from 1 and the clip acts.
Groups whose samples all got the same reward carry no signal and are not trained on. Completions are
trained on the exact token ids that were sampled.
Needs no ground truth in the training context: only the verdicts (as rewards), never a hint.

The old policy of the ratio is the one that sampled, at the temperature it sampled with: its log-probs
are the sampler's own (`Completion.logprobs`, softmax(logits / T), no dropout), recorded while decoding,
and the new policy's are computed on the logits divided by the same T. The nucleus (top-p) cut is not
part of either, as in TRL's GRPO.

Seeds: prompts come from work.seed("prompts") as in SPEAR, and the G copies of the prompts go to the
sampler sample-major ([all prompts] x G) with SPEAR's first-attempt seed, so sample 0 of every group
is the first attempt SPEAR would have drawn; it defines first_try_correct.

Left out on purpose: a value model (GRPO has none), the paper's reference model (ours is the
round-start global adapter, which also sampled, so its log-probs are both the ratio's denominator and
the KL reference), the paper's per-sequence 1/|o_i| averaging (we average over all completion tokens
of the batch, as SPEAR's likelihood term does), process rewards, and the iterative reward-model updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spearfl.algorithms.base import (
    ClientContext,
    ClientResult,
    ClientRound,
    Collected,
    Sampler,
    Trainer,
    client_round,
    pass_minibatches,
    train_steps,
)
from spearfl.lm.training import MicroBatch, collate
from spearfl.losses.policy import (
    clipped_fraction,
    clipped_surrogate_loss,
    group_advantages,
    k3_kl,
)


@dataclass
class Rollout:
    """A sampled completion with its group-normalised advantage and its log-probs under the sampling policy."""

    prompt: list[int]
    completion: list[int]
    advantage: float
    old_logprobs: torch.Tensor  # [len(completion)] float32, CPU: the sampler's, without dropout


def sample_groups(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> Collected:
    """Sample and judge G completions per prompt; keep the rollouts of groups with mixed rewards.

    Weight = number of prompts whose group had mixed rewards: when every group agreed with itself, all
    advantages are 0 and a step would only add noise, so the round is skipped.
    """
    num_prompts, group_size = len(prompts), context.config.grpo.group_size
    completions, feedback = sample(prompts * group_size, examples * group_size, "first-attempt", "GRPO samples")
    rewards = torch.tensor([float(f.correct) for f in feedback]).view(group_size, num_prompts).T  # [P, G]
    advantages = group_advantages(rewards)  # [P, G]
    informative = (rewards.std(dim=-1) > 0).tolist()  # [P]
    rollouts = [
        Rollout(prompts[p], completion.token_ids, float(advantages[p, g]), torch.tensor(completion.logprobs))
        for p in range(num_prompts) if informative[p]
        for g, completion in ((g, completions[g * num_prompts + p]) for g in range(group_size))
    ]
    metrics = {
        "first_try_correct": int(rewards[:, 0].sum()),
        "sample_accuracy": sum(f.correct for f in feedback) / len(feedback),
        "informative_groups": sum(informative),
    }
    return Collected(rollouts, float(sum(informative)), metrics)


def grpo_step(context: ClientContext, trainer: Trainer, rollouts: list[Rollout]) -> tuple[float, dict]:
    """Accumulate the gradient of L = -clipped surrogate + kl_coef x KL(policy || round-start), both averaged over
    the completion tokens of the step's rollouts; returns L and its parts."""
    settings = context.config.grpo
    batch = collate(
        [r.prompt for r in rollouts], [r.completion for r in rollouts], context.prompts.tokenizer.pad_token_id, context.device
    )
    old_logprobs = batch.right_aligned([r.old_logprobs for r in rollouts], dtype=torch.float32)  # [B, K]
    advantages = torch.tensor([r.advantage for r in rollouts], device=context.device)  # [B]
    tokens = int(batch.completion_mask.sum())

    def contribution(micro: MicroBatch) -> tuple[torch.Tensor, dict]:
        logprobs = micro.logprobs(sampling_temperature(context))  # [b, K]
        old, advantage, mask = old_logprobs[micro.rows], advantages[micro.rows], micro.batch.completion_mask
        surrogate = clipped_surrogate_loss(logprobs, old, advantage, mask, settings.clip_epsilon, tokens)
        kl = k3_kl(logprobs, old, mask, tokens)
        shares = {
            "surrogate": float(surrogate.detach()),
            "kl": float(kl.detach()),
            "clipped_fraction": clipped_fraction(logprobs, old, advantage, mask, settings.clip_epsilon, tokens),
            "trained_tokens": micro.batch.num_tokens,
        }
        return surrogate + settings.kl_coef * kl, shares

    return trainer(batch, contribution)


def sampling_temperature(context: ClientContext) -> float:
    """The temperature the rollouts were sampled at (greedy decoding samples from the untempered policy)."""
    return context.config.generation.temperature or 1.0


def train(context: ClientContext, work: ClientRound, rollouts: list[Rollout]) -> dict:
    """The local steps as passes over every rollout in minibatches; returns training metrics.

    A pass with more steps than rollouts takes one step per rollout, so a round with very few rollouts
    takes fewer steps (`optimizer_steps` says how many).
    """
    steps, passes = context.config.budget("grpo").local_steps, context.config.grpo.passes
    batches = pass_minibatches(len(rollouts), steps, passes, np.random.default_rng(work.seed("minibatches")))

    def step_gradient(rng, step, trainer):
        return grpo_step(context, trainer, [rollouts[index] for index in batches[step]])

    return train_steps(context, work, len(batches), step_gradient)


def client_update(context: ClientContext, work: ClientRound) -> ClientResult:
    """One GRPO round on one client; weight = number of prompts whose group had mixed rewards, 0 if none."""
    return client_round(context, work, context.config.budget("grpo").prompts_per_round, sample_groups, train)
