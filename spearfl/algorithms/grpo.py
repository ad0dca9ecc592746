"""GRPO client update: group-relative policy optimisation (Shao et al., 2024, DeepSeekMath, arXiv 2402.03300).

One round on one client: sample G completions for each of n prompts from the round-start (global)
adapter, reward each 1 if the feedback provider's verdict is "correct" and 0 otherwise, normalise the
rewards within each prompt's group into advantages, then take `local_steps` optimizer steps on the
PPO clipped surrogate plus kl_coef x KL (k3 estimator) to the round-start adapter. Each batch of
completions is used for `updates_per_batch` consecutive steps, so from its second step on the ratio
new / old policy departs from 1 and the clip acts. Groups whose samples all got the same reward carry
no signal and are not trained on. Completions are trained on the exact token ids that were sampled.
Needs no ground truth in the training context: only the verdicts (as rewards), never a hint.
The old-policy log-probs of the ratio are the sampler's own (`Completion.logprobs`, temperature 1, no
dropout), recorded while decoding, so no forward pass is spent on recomputing them.

Seeds: prompts come from work.seed("prompts") as in SPEAR, and the G copies of the prompts go to the
sampler sample-major ([all prompts] x G) with SPEAR's first-attempt seed, so sample 0 of every group
is the first attempt SPEAR would have drawn; it defines first_try_correct.

Left out on purpose: a value model (GRPO has none), the paper's reference model (ours is the
round-start global adapter, which also sampled, so its log-probs are both the ratio's denominator and
the KL reference), the paper's per-sequence 1/|o_i| averaging (we average over all completion tokens
of the batch, as SPEAR's likelihood term does), process rewards, and the iterative reward-model updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from spearfl.algorithms.base import (
    ClientContext,
    ClientResult,
    ClientRound,
    peak_memory_mb,
    reset_peak_memory,
    sample_and_judge,
    sample_examples,
    train_steps,
)
from spearfl.lm.models import get_adapter_state, set_adapter_state
from spearfl.lm.training import CompletionBatch, collate, completion_logits, draw
from spearfl.losses.policy import (
    clipped_fraction,
    clipped_surrogate_loss,
    group_advantages,
    k3_kl,
)
from spearfl.losses.spear import token_logprobs


@dataclass
class Rollout:
    """A sampled completion with its group-normalised advantage and its log-probs under the sampling policy."""

    prompt: list[int]
    completion: list[int]
    advantage: float
    old_logprobs: torch.Tensor  # [len(completion)] float32, CPU: the sampler's, without dropout


def sample_groups(context: ClientContext, work: ClientRound, examples, prompts) -> tuple[list[Rollout], dict]:
    """Sample and judge G completions per prompt; keep the rollouts of groups with mixed rewards."""
    num_prompts, group_size = len(prompts), context.config.grpo.group_size
    started = time.perf_counter()
    completions, feedback, feedback_seconds = sample_and_judge(
        context, prompts * group_size, examples * group_size, work.seed("first-attempt"),
        f"client {work.client_id} GRPO samples",
    )
    rewards = torch.tensor([float(f.correct) for f in feedback]).view(group_size, num_prompts).T  # [P, G]
    advantages = group_advantages(rewards)  # [P, G]
    informative = (rewards.std(dim=-1) > 0).tolist()  # [P]
    rollouts = [
        Rollout(prompts[p], sample.token_ids, float(advantages[p, g]), torch.tensor(sample.logprobs))
        for p in range(num_prompts) if informative[p]
        for g, sample in ((g, completions[g * num_prompts + p]) for g in range(group_size))
    ]
    first_try_correct = int(rewards[:, 0].sum())
    metrics = {
        "prompts": num_prompts,
        "first_try_correct": first_try_correct,
        "first_try_accuracy": first_try_correct / num_prompts,
        "revised_correct": 0,
        "revision_success": float("nan"),
        "wins": 0,
        "losses": 0,
        "sample_accuracy": sum(f.correct for f in feedback) / len(feedback),
        "informative_groups": sum(informative),
        "generations": len(completions),
        "generated_tokens": sum(len(completion.token_ids) for completion in completions),
        "feedback_seconds": feedback_seconds,
        "generation_seconds": time.perf_counter() - started - feedback_seconds,
    }
    return rollouts, metrics


def right_aligned_values(batch: CompletionBatch, rows: list[torch.Tensor]) -> torch.Tensor:
    """Place one value per completion token into a [B, K] tensor aligned with `batch.targets` (0 elsewhere)."""
    values = torch.zeros(batch.targets.shape, dtype=torch.float32)
    for row, row_values in enumerate(rows):
        values[row, -len(row_values):] = row_values
    return values.to(batch.targets.device)


def grpo_loss(context: ClientContext, rollouts: list[Rollout]) -> tuple[torch.Tensor, dict]:
    """L = -clipped surrogate + kl_coef x KL(policy || round-start), both averaged over completion tokens."""
    settings = context.config.grpo
    batch = collate(
        [r.prompt for r in rollouts], [r.completion for r in rollouts], context.prompts.tokenizer.pad_token_id, context.device
    )
    logprobs = token_logprobs(completion_logits(context.model, batch), batch.targets)  # [B, K]
    old_logprobs = right_aligned_values(batch, [r.old_logprobs for r in rollouts])  # [B, K]
    advantages = torch.tensor([r.advantage for r in rollouts], device=context.device)  # [B]
    mask = batch.completion_mask
    surrogate = clipped_surrogate_loss(logprobs, old_logprobs, advantages, mask, settings.clip_epsilon)
    kl = k3_kl(logprobs, old_logprobs, mask)
    parts = {
        "surrogate": float(surrogate.detach()),
        "kl": float(kl.detach()),
        "clipped_fraction": clipped_fraction(logprobs, old_logprobs, advantages, mask, settings.clip_epsilon),
        "trained_tokens": batch.num_tokens,
    }
    return surrogate + settings.kl_coef * kl, parts


def train(context: ClientContext, work: ClientRound, rollouts: list[Rollout]) -> dict:
    """local_steps optimizer steps; each batch of B rollouts serves updates_per_batch consecutive steps."""
    settings = context.config.grpo
    batch: list[Rollout] = []

    def step_loss(rng, step):
        nonlocal batch
        if step % settings.updates_per_batch == 0:
            batch = draw(rollouts, settings.batch_size, rng)
        return grpo_loss(context, batch)

    return train_steps(context, work, settings.local_steps, step_loss)


def client_update(context: ClientContext, work: ClientRound) -> ClientResult:
    """One GRPO round on one client; weight = number of prompts whose group had mixed rewards, 0 if none."""
    started = time.perf_counter()
    reset_peak_memory(context.device)
    set_adapter_state(context.model, work.global_state)
    examples = sample_examples(work.examples, context.config.grpo.prompts_per_round, work.seed("prompts"))
    prompts = [context.prompts.task(example) for example in examples]
    rollouts, metrics = sample_groups(context, work, examples, prompts)
    metrics.update(trained_tokens=0, training_seconds=0.0)
    if not rollouts:
        # Every group agreed with itself: all advantages are 0, a step would only add noise.
        metrics.update(seconds=time.perf_counter() - started, peak_memory_mb=peak_memory_mb(context.device), skipped=1)
        return ClientResult(state=work.global_state, weight=0.0, metrics=metrics)
    training_started = time.perf_counter()
    metrics.update(train(context, work, rollouts))
    metrics["training_seconds"] = time.perf_counter() - training_started
    metrics.update(seconds=time.perf_counter() - started, peak_memory_mb=peak_memory_mb(context.device), skipped=0)
    return ClientResult(state=get_adapter_state(context.model), weight=float(metrics["informative_groups"]), metrics=metrics)
