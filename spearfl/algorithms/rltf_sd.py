"""RLTF-SD client update: RL from text feedback with self-distillation (Song, Chen, Tajwar, Munos, Pathak,
Bagnell, Singh, Zanette, 2026, "Expanding the Capabilities of Reinforcement Learning via Text Feedback",
arXiv 2602.02482, Algorithm 1).

One round on one client. For each of n prompts x0, a group of N first answers y0 (sampled together, as
GRPO's groups are); the feedback provider judges each. A wrong y0 gets its verdict and hint and one
revision y1 under the revision prompt x1 (task, y0, feedback, instruction to answer afresh), judged too;
a right y0 ends its episode (the paper's early termination). Rewards r0, r1 are 1 for "correct", else 0.
Three advantages per rollout, each with a per-prompt baseline over its group (`rltf_advantages`):

    first turn    A0 = (r0 + gamma r1) - group mean of that return         on log pi(y0 | x0)
    second turn   A1 = r1 - group mean of r1 over the revised rollouts     on log pi(y1 | x1)
    distillation  Ad = r1 - group mean of r0 (the paper's Eq. 7)           on log pi(y1 | x0)

    L = REINFORCE(A0) + REINFORCE(A1) + distill_coef x REINFORCE(Ad)

The distillation term is the paper's advantage-weighted regression: a revision is trained under the
ORIGINAL prompt, raised when it beats the group's first attempts and lowered when it does not, so a wrong
revision is pushed down too. Every completion is trained on the exact token ids that were sampled. Needs no
ground truth in the training context: only the verdicts and the (leak-checked) hints.

Seeds: prompts from work.seed("prompts") and the N copies of the prompts sample-major with SPEAR's
first-attempt seed, as GRPO's, so sample 0 of every group is the first attempt SPEAR would have drawn; it
defines first_try_correct and the revision counters.

Where it differs from the paper, and why:
- Each term is averaged over its own completion tokens of a batch, as every spearfl loss is; the paper's
  code sums over tokens (its text says only "token-level surrogate").
- The local steps are one pass over all of the round's weighted completions in minibatches (the paper takes
  one on-policy step per batch): every method gets the same optimizer steps (`client.local_steps`). The later
  steps use no importance ratio, as the paper's distillation uses none.
- Defaults: gamma 0.1 and distill_coef 0.1 are the paper's (its code's discount, its Table 2 coefficient);
  group_size 4, not the paper's 8, so that a round costs a CPU what GRPO's does.
- Left out: the paper's code masks distillation tokens whose log-probability under x0 is below -5 (the paper
  does not mention it), the linear ramp of the coefficient used for math, and RLTF-FM (feedback modelling).
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
    round_prefix_cache,
    train_steps,
)
from spearfl.lm.training import MicroBatch, collate
from spearfl.losses.policy import reinforce_loss, rltf_advantages

TERMS = ("first_turn_pg", "second_turn_pg", "distill")


@dataclass
class Weighted:
    """A sampled completion, the prompt it is trained under, its advantage and the loss term it belongs to."""

    prompt: list[int]
    completion: list[int]
    advantage: float
    term: str  # one of TERMS


def collect_groups(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> tuple[list[list[Weighted]], dict]:
    """N first attempts per prompt, a revision of each wrong one, and the three advantages; returns, per prompt,
    its completions with a non-zero weight, and the round's metrics."""
    settings = context.config.rltf_sd
    num_prompts, group_size = len(prompts), settings.group_size
    prefixes = round_prefix_cache(context)  # each revision prompt begins with its task prompt: its prefill runs only the rest
    first, feedback = sample(prompts * group_size, examples * group_size, "first-attempt", "first attempts", prefixes)
    wrong = [index for index, verdict in enumerate(feedback) if not verdict.correct]  # sample-major: g * n + p
    prefixes.retain([prompts[index % num_prompts] for index in wrong])
    revision_prompts = {
        index: context.prompts.revision(examples[index % num_prompts], first[index].text, feedback[index].text) for index in wrong
    }
    revised, revised_feedback = sample(
        list(revision_prompts.values()), [examples[index % num_prompts] for index in wrong], "revision-1", "revisions", prefixes
    )
    revision = dict(zip(wrong, revised))
    first_rewards = torch.tensor([float(f.correct) for f in feedback]).view(group_size, num_prompts).T  # [n, N]
    revision_rewards = torch.full((group_size * num_prompts,), float("nan"))
    revision_rewards[wrong] = torch.tensor([float(f.correct) for f in revised_feedback])
    revision_rewards = revision_rewards.view(group_size, num_prompts).T  # [n, N], NaN: no second turn
    advantages = rltf_advantages(first_rewards, revision_rewards, settings.discount)  # three [n, N]
    groups = []
    for p in range(num_prompts):
        weighted = []
        for g in range(group_size):
            index = g * num_prompts + p
            weighted.append(Weighted(prompts[p], first[index].token_ids, float(advantages[0][p, g]), "first_turn_pg"))
            if index in revision:
                completion = revision[index].token_ids
                weighted.append(Weighted(revision_prompts[index], completion, float(advantages[1][p, g]), "second_turn_pg"))
                if settings.distill_coef > 0:
                    weighted.append(Weighted(prompts[p], completion, float(advantages[2][p, g]), "distill"))
        groups.append([item for item in weighted if item.advantage != 0])
    first_wrong = [p for p in range(num_prompts) if p in revision]  # sample 0 of prompt p has index p
    fixed = sum(bool(revision_rewards[p, 0]) for p in first_wrong)
    metrics = {
        "first_try_correct": int(first_rewards[:, 0].sum()),
        "revised_correct": fixed,
        "revision_success": fixed / len(first_wrong) if first_wrong else float("nan"),
        "sample_accuracy": float(first_rewards.mean()),
        "second_turn_accuracy": sum(f.correct for f in revised_feedback) / len(wrong) if wrong else float("nan"),
    }
    return groups, metrics


def collect(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> Collected:
    """The round's weighted completions; weight = the prompts with a learning signal.

    None has one when every group's rewards agree in both turns: every advantage is 0, the round is skipped.
    """
    groups, metrics = collect_groups(context, work, sample, examples, prompts)
    weighted = [item for group in groups for item in group]
    metrics |= {"signal_prompts": sum(bool(group) for group in groups), "distilled": sum(w.term == "distill" for w in weighted)}
    return Collected(weighted, float(metrics["signal_prompts"]), metrics)


def rltf_sd_step(context: ClientContext, trainer: Trainer, weighted: list[Weighted]) -> tuple[float, dict]:
    """Accumulate the gradient of the three REINFORCE terms of the step's completions, each averaged over its own
    tokens; returns the loss and its parts."""
    settings = context.config.rltf_sd
    batch = collate([w.prompt for w in weighted], [w.completion for w in weighted], context.prompts.tokenizer.pad_token_id, context.device)
    advantages = torch.tensor([w.advantage for w in weighted], device=context.device)  # [B]
    terms = [(term, coefficient, torch.tensor([w.term == term for w in weighted], device=context.device))
             for term, coefficient in zip(TERMS, (1.0, 1.0, settings.distill_coef))]
    tokens = {term: int(batch.completion_mask[rows].sum()) for term, _, rows in terms}

    def contribution(micro: MicroBatch) -> tuple[torch.Tensor, dict]:
        logprobs = micro.logprobs()  # [b, K]
        total = torch.zeros((), device=context.device)
        shares = {term: 0.0 for term in TERMS} | {"trained_tokens": micro.batch.num_tokens}
        for term, coefficient, rows in terms:
            mine = rows[micro.rows]  # [b] bool
            if tokens[term] and mine.any():
                loss = reinforce_loss(logprobs[mine], advantages[micro.rows][mine], micro.batch.completion_mask[mine], tokens[term])
                total = total + coefficient * loss
                shares[term] = float(loss.detach())
        return total, shares

    return trainer(batch, contribution)


def train(context: ClientContext, work: ClientRound, weighted: list[Weighted]) -> dict:
    """The local steps as one pass over every weighted completion in minibatches; returns training metrics."""
    steps = context.config.budget("rltf_sd").local_steps
    batches = pass_minibatches(len(weighted), steps, 1, np.random.default_rng(work.seed("minibatches")))

    def step_gradient(rng, step, trainer):
        return rltf_sd_step(context, trainer, [weighted[index] for index in batches[step]])

    return train_steps(context, work, len(batches), step_gradient)


def client_update(context: ClientContext, work: ClientRound) -> ClientResult:
    """One RLTF-SD round on one client; weight = number of prompts with a learning signal, 0 if none."""
    return client_round(context, work, context.config.budget("rltf_sd").prompts_per_round, collect, train)
