"""RLTF-SD client update: RL from text feedback with self-distillation (Song, Chen, Tajwar, Munos, Pathak,
Bagnell, Singh, Zanette, 2026, "Expanding the Capabilities of Reinforcement Learning via Text Feedback",
arXiv 2602.02482).

One round on one client, a two-turn rollout per prompt: the first answer y0 to the task x0, the
feedback provider's verdict and hint on it, then one revision y1 under the revision prompt x1 (task,
y0, feedback, instruction to answer afresh), judged too. Rewards r0, r1 are 1 for "correct", else 0.
The loss, averaged over completion tokens as everywhere in spearfl:

    L = PG(y0 | x0, r0 - mean r0) + PG(y1 | x1, r1 - mean r1) + distill_coef x CE(correct y1 | x0)

PG is REINFORCE with a baseline: each turn's baseline is the mean reward of that turn over the
round's n prompts (the batch the client sampled), so an answer better than the turn's average is
raised and a worse one lowered. The last term is the self-distillation: a correct revision is
trained under the ORIGINAL prompt, so the model learns to answer without the feedback in context.
Every completion is trained on the exact token ids that were sampled.
Needs no ground truth in the training context: only the verdicts and the (leak-checked) hints.

Seeds: prompts, first attempts and revisions use SPEAR's seeds ("prompts", "first-attempt",
"revision-1"), so with the same adapter both methods see the same prompts and first attempts.

Left out on purpose: the paper weighs the distilled y1 by A0 = r1 - mean r0 (advantage-weighted
regression, so a wrong y1 is also pushed down under x0); we distill only the correct y1, with unit
weight, as the project's statement of this baseline says. Also left out: the paper's feedback
modelling variant (RLTF-FM), importance ratios for the later local steps (samples come from the
round-start adapter, as in SPEAR), and more than one revision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spearfl.algorithms.base import (
    ClientContext,
    ClientResult,
    ClientRound,
    Collected,
    Sampler,
    client_round,
    draw,
    train_steps,
)
from spearfl.lm.prefix_cache import PrefixCache
from spearfl.lm.training import collate, target_logprobs
from spearfl.losses.policy import baseline_advantages, reinforce_loss
from spearfl.losses.spear import likelihood_loss


@dataclass
class TwoTurns:
    """One prompt's two-turn rollout with the advantage of each turn."""

    prompt: list[int]  # x0, the task
    first: list[int]  # y0, sampled under x0
    revision_prompt: list[int]  # x1 = task, y0, feedback, instruction
    revision: list[int]  # y1, sampled under x1
    first_advantage: float
    revision_advantage: float
    revision_correct: bool  # a correct y1 is distilled under x0

    def has_signal(self, distill_coef: float) -> bool:
        """Whether any loss term of this prompt has a non-zero coefficient."""
        distilled = self.revision_correct and distill_coef > 0
        return self.first_advantage != 0 or self.revision_advantage != 0 or distilled


def collect_turns(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> tuple[list[TwoTurns], dict]:
    """First attempts, feedback, one revision of every attempt, and both turns' rewards; returns (rollouts, metrics)."""
    prefixes = PrefixCache()  # each revision prompt begins with its task prompt: its prefill runs only the rest
    first, feedback = sample(prompts, examples, "first-attempt", "first attempts", prefixes)
    prefixes.retain(prompts)
    revision_prompts = [
        context.prompts.revision(example, completion.text, verdict.text)
        for example, completion, verdict in zip(examples, first, feedback)
    ]
    revised, revised_feedback = sample(revision_prompts, examples, "revision-1", "revisions", prefixes)
    first_rewards = torch.tensor([float(f.correct) for f in feedback])  # [n]
    revision_rewards = torch.tensor([float(f.correct) for f in revised_feedback])  # [n]
    first_advantages = baseline_advantages(first_rewards).tolist()
    revision_advantages = baseline_advantages(revision_rewards).tolist()
    rollouts = [
        TwoTurns(prompts[i], first[i].token_ids, revision_prompts[i], revised[i].token_ids,
                 first_advantages[i], revision_advantages[i], revised_feedback[i].correct)
        for i in range(len(prompts))
    ]
    num_wrong = sum(not f.correct for f in feedback)
    fixed = sum(not f.correct and r.correct for f, r in zip(feedback, revised_feedback))
    metrics = {
        "first_try_correct": len(prompts) - num_wrong,
        "revised_correct": fixed,
        "revision_success": fixed / num_wrong if num_wrong else float("nan"),
        "second_turn_accuracy": sum(f.correct for f in revised_feedback) / len(prompts),
    }
    return rollouts, metrics


def collect(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> Collected:
    """The two-turn rollouts with a learning signal; weight = their number.

    None has one when every turn's rewards agree and no revision is correct: every term is 0, the round is skipped.
    """
    distill_coef = context.config.rltf_sd.distill_coef
    rollouts, metrics = collect_turns(context, work, sample, examples, prompts)
    rollouts = [r for r in rollouts if r.has_signal(distill_coef)]
    metrics |= {
        "signal_prompts": len(rollouts),
        "distilled": sum(r.revision_correct for r in rollouts) if distill_coef > 0 else 0,
    }
    return Collected(rollouts, float(len(rollouts)), metrics)


def rltf_sd_loss(context: ClientContext, rollouts: list[TwoTurns]) -> tuple[torch.Tensor, dict]:
    """PG on y0 | x0 and on y1 | x1 (rows with a non-zero advantage) + distill_coef x CE(correct y1 | x0), one forward."""
    distill_coef = context.config.rltf_sd.distill_coef
    first = [r for r in rollouts if r.first_advantage != 0]
    second = [r for r in rollouts if r.revision_advantage != 0]
    distilled = [r for r in rollouts if r.revision_correct] if distill_coef > 0 else []
    prompts = [r.prompt for r in first] + [r.revision_prompt for r in second] + [r.prompt for r in distilled]
    completions = [r.first for r in first] + [r.revision for r in second] + [r.revision for r in distilled]
    batch = collate(prompts, completions, context.prompts.tokenizer.pad_token_id, context.device)
    logprobs = target_logprobs(context.model, batch)  # [B, K]
    mask = batch.completion_mask
    num_first, num_policy = len(first), len(first) + len(second)
    total = torch.zeros((), device=context.device)
    parts = {"first_turn_pg": 0.0, "second_turn_pg": 0.0, "distill_nll": 0.0, "trained_tokens": batch.num_tokens}
    for name, rows, advantages in (
        ("first_turn_pg", slice(0, num_first), [r.first_advantage for r in first]),
        ("second_turn_pg", slice(num_first, num_policy), [r.revision_advantage for r in second]),
    ):
        if advantages:
            term = reinforce_loss(logprobs[rows], torch.tensor(advantages, device=context.device), mask[rows])
            total = total + term
            parts[name] = float(term.detach())
    if distilled:
        rows = slice(num_policy, None)
        distill_nll = likelihood_loss(logprobs[rows], mask[rows])
        total = total + distill_coef * distill_nll
        parts["distill_nll"] = float(distill_nll.detach())
    return total, parts


def train(context: ClientContext, work: ClientRound, rollouts: list[TwoTurns]) -> dict:
    """local_steps optimizer steps, each on the rollouts of batch_size prompts drawn at random."""
    settings = context.config.rltf_sd

    def step_loss(rng, step):
        return rltf_sd_loss(context, draw(rollouts, settings.batch_size, rng))

    return train_steps(context, work, context.config.budget("rltf_sd").local_steps, step_loss)


def client_update(context: ClientContext, work: ClientRound) -> ClientResult:
    """One RLTF-SD round on one client; weight = number of prompts with a learning signal, 0 if none."""
    return client_round(context, work, context.config.budget("rltf_sd").prompts_per_round, collect, train)
