"""SPEAR client update: self-play refinement from partial feedback (Lee et al., 2026, arXiv 2605.07977).

One round on one client: answer n prompts once, get a verdict (and a non-answer hint) for each, revise
the wrong ones up to R times, then train the adapter on its own correct answers (likelihood) and away
from its confident wrong ones (tail unlikelihood). Every trace is trained under the ORIGINAL prompt,
on the exact token ids that were sampled, so the model learns to answer without the hint.
Needs no ground truth in the training context: only the verdicts and hints.

The same round learns from real people (`live_client_update`): their judged first answers and revisions,
read from the device's interaction store, become the same wins and losses, on the stored token ids.

Left out on purpose: revision prompts are not trained on, and the local optimizer starts fresh each
round (its state never leaves the client).
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
    draw,
    envelope,
    round_prefix_cache,
    train_steps,
)
from spearfl.data.store import Interaction
from spearfl.lm.generation import Completion, eos_token_ids
from spearfl.lm.models import lora_parameters
from spearfl.lm.training import MicroBatch, collate
from spearfl.losses.spear import (
    anchor_loss,
    likelihood_loss,
    unlikelihood_loss,
    unlikelihood_mask,
)


@dataclass
class Trace:
    """A completion to learn from, under the original prompt. Confidence weighs a loss; wins have 1."""

    prompt: list[int]
    completion: list[int]
    confidence: float = 1.0
    protected: list[bool] | None = None
    prompt_index: int = -1  # which of the round's prompts it answers: the aggregation weight counts prompts


@dataclass
class Traces:
    """A round's wins (trained up) and losses (pushed down), all under their original prompts."""

    wins: list[Trace]
    losses: list[Trace]


def protected_token_flags(tokenizer, token_ids: list[int], strings: list[str]) -> list[bool]:
    """Flag the tokens that spell a whole occurrence of a protected string (e.g. "Answer:").

    Works on character spans of the decoded completion, so only tokens inside an actual occurrence of
    the full string are protected; a "." or ":" elsewhere stays trainable (the reference protected
    every sub-token of the string everywhere).
    """
    ends = [len(tokenizer.decode(token_ids[: index + 1])) for index in range(len(token_ids))]
    text = tokenizer.decode(token_ids)
    spans = []
    for string in strings:
        start = text.find(string)
        while start != -1:
            spans.append((start, start + len(string)))
            start = text.find(string, start + 1)
    flags = []
    for index, end in enumerate(ends):
        begin = ends[index - 1] if index else 0
        flags.append(any(begin < span_end and end > span_start for span_start, span_end in spans))
    return flags


def format_token_flags(tokenizer, completion: Completion, strings: list[str]) -> list[bool]:
    """Protected tokens of a completion: whole protected strings, and the newline that ends the answer line.

    That newline closes every answer, right or wrong, like EOS: pushing it down teaches rambling.
    """
    flags = protected_token_flags(tokenizer, completion.token_ids, strings)
    if completion.finished_by == "stop":
        flags[-1] = True
    return flags


def collect_traces(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> tuple[list, list, dict]:
    """Attempt, judge, revise; return (wins, losses, metrics)."""
    settings = context.config.spear
    prefixes = round_prefix_cache(context)  # a revision prompt begins with its task prompt: its prefill runs only the rest
    first, feedback = sample(prompts, examples, "first-attempt", "first attempts", prefixes)
    wins = [Trace(prompts[index], first[index].token_ids, prompt_index=index) for index, f in enumerate(feedback) if f.correct]
    pending = [index for index, f in enumerate(feedback) if not f.correct]
    prefixes.retain([prompts[index] for index in pending])
    latest = {index: (first[index], feedback[index]) for index in pending}
    fixed: set[int] = set()
    for attempt in range(1, settings.num_revisions + 1):
        open_items = [index for index in pending if index not in fixed]
        if not open_items:
            break
        revision_prompts = [
            context.prompts.revision(examples[index], latest[index][0].text, latest[index][1].text) for index in open_items
        ]
        prefixes.retain([prompts[index] for index in open_items])  # a prompt fixed already is not revised again
        prefixes.forget_after_use = attempt == settings.num_revisions  # the states' last use
        revised, revised_feedback = sample(
            revision_prompts, [examples[index] for index in open_items], f"revision-{attempt}", f"revision {attempt}", prefixes
        )
        for index, completion, verdict in zip(open_items, revised, revised_feedback):
            latest[index] = (completion, verdict)
            if verdict.correct:
                fixed.add(index)
                wins.append(Trace(prompts[index], completion.token_ids, prompt_index=index))
    losses = [
        Trace(
            prompts[index],
            first[index].token_ids,
            settings.confidence_fixed if index in fixed else settings.confidence_unfixed,
            format_token_flags(context.prompts.tokenizer, first[index], settings.protected_strings),
            index,
        )
        for index in pending
    ]
    metrics = {
        "first_try_correct": len(prompts) - len(pending),
        "revised_correct": len(fixed),
        "revision_success": len(fixed) / len(pending) if pending else float("nan"),
    }
    return wins, losses, metrics


def collect(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> Collected:
    """Sample, judge and revise; the traces weighed as `weighed` says."""
    wins, losses, metrics = collect_traces(context, work, sample, examples, prompts)
    return weighed(context, work, wins, losses, metrics)


def traces_from_interactions(context: ClientContext, interactions: list[Interaction]) -> tuple[list, list, dict]:
    """People's judged answers as SPEAR's traces, exactly as a simulated round makes them: a first answer judged
    right is a win; one judged wrong is a loss (at confidence_fixed when a revision was judged right, which is
    then a win under the original prompt, unless the hint before it gave the answer away), all on the stored
    token ids. Returns (wins, losses, metrics)."""
    settings, tokenizer = context.config.spear, context.prompts.tokenizer
    wins, losses, fixed = [], [], 0
    for index, interaction in enumerate(interactions):
        first = interaction.first
        if first.verdict:
            wins.append(Trace(first.prompt_ids, first.token_ids, prompt_index=index))
            continue
        attempts = interaction.attempts
        right = next((number for number in range(1, len(attempts)) if attempts[number].verdict), None)
        if right is not None:
            fixed += 1
            if not attempts[right - 1].hint_gave_answer:
                wins.append(Trace(first.prompt_ids, attempts[right].token_ids, prompt_index=index))
        completion = Completion(first.token_ids, first.text, first.finished_by)
        flags = format_token_flags(tokenizer, completion, settings.protected_strings)
        confidence = settings.confidence_fixed if right is not None else settings.confidence_unfixed
        losses.append(Trace(first.prompt_ids, first.token_ids, confidence, flags, index))
    wrong = len(losses)
    metrics = {
        "first_try_correct": len(interactions) - wrong,
        "revised_correct": fixed,
        "revision_success": fixed / wrong if wrong else float("nan"),
    }
    return wins, losses, metrics


def live_client_update(context: ClientContext, work: ClientRound, interactions: list[Interaction]) -> ClientResult:
    """One SPEAR round on people's judged interactions (first attempts judged, none consumed, none stale).

    Fewer than `live.min_interactions`: weight 0, nothing trained. Generates nothing: the answers were given.
    """

    def gather(sampler: Sampler) -> tuple[int, Collected]:
        if len(interactions) < context.config.live.min_interactions:
            return len(interactions), Collected(None, 0.0, {"first_try_correct": sum(bool(i.first.verdict) for i in interactions)})
        wins, losses, metrics = traces_from_interactions(context, interactions)
        return len(interactions), weighed(context, work, wins, losses, metrics)

    return envelope(context, work, gather, train)


def weighed(context: ClientContext, work: ClientRound, wins: list[Trace], losses: list[Trace], metrics: dict) -> Collected:
    """The round's traces with the losses capped; weight = the prompts trained on (`base.Collected`): those with
    a win or a kept loss (a loss only while lambda_lose > 0, else it is not trained on). Without a win the
    weight is 0 and nothing is trained: unlikelihood alone would only push mass away and collapse the model."""
    losses = cap_losses(losses, len(wins), context.config.spear.lose_cap_ratio, work.seed("lose-cap"))
    trained = wins + (losses if context.config.spear.lambda_lose > 0 else [])
    weight = len({trace.prompt_index for trace in trained}) if wins else 0
    return Collected(Traces(wins, losses), float(weight), metrics | {"wins": len(wins), "losses": len(losses)})


def cap_losses(losses: list[Trace], num_wins: int, ratio: float, seed: int) -> list[Trace]:
    """Keep at most ratio x wins losses, chosen at random."""
    limit = int(ratio * num_wins)
    if len(losses) <= limit:
        return losses
    keep = np.random.default_rng(seed).choice(len(losses), size=limit, replace=False)
    return [losses[int(index)] for index in sorted(keep)]


def spear_step(context: ClientContext, trainer: Trainer, wins: list[Trace], losses: list[Trace], reference) -> tuple[float, dict]:
    """Accumulate the gradient of L = lambda_win CE(wins) + lambda_lose UL(losses) + lambda_anchor ||theta - theta_global||^2
    over one step's traces (in micro-batches when the memory plan says so); returns L and its parts."""
    settings = context.config.spear
    losses = losses if settings.lambda_lose > 0 else []  # with no weight they would cost compute for nothing
    traces = wins + losses
    batch = collate(
        [t.prompt for t in traces], [t.completion for t in traces], context.prompts.tokenizer.pad_token_id, context.device
    )
    num_wins = len(wins)
    win_tokens = int(batch.completion_mask[:num_wins].sum())
    if losses:
        flags = [torch.tensor(t.protected, dtype=torch.bool) for t in losses]
        protected = batch.right_aligned(flags, fill=False)  # [losses, K]
        loss_mask = unlikelihood_mask(
            batch.completion_mask[num_wins:], batch.targets[num_wins:], protected,
            settings.tail_tokens, end_of_turn_ids(context),
        )
        confidence = torch.tensor([t.confidence for t in losses], device=context.device)
        loss_sequences = int((loss_mask.sum(-1) > 0).sum())

    def contribution(micro: MicroBatch) -> tuple[torch.Tensor, dict]:
        logprobs = micro.logprobs()  # [b, K]
        is_win = micro.rows < num_wins
        win_nll = likelihood_loss(logprobs[is_win], micro.batch.completion_mask[is_win], win_tokens)
        total = settings.lambda_win * win_nll
        shares = {"win_nll": float(win_nll.detach()), "trained_tokens": micro.batch.num_tokens}
        if losses:
            rows = micro.rows[~is_win] - num_wins
            lose_ul = unlikelihood_loss(logprobs[~is_win], loss_mask[rows], confidence[rows], settings.margin, loss_sequences)
            total = total + settings.lambda_lose * lose_ul
            shares["lose_unlikelihood"] = float(lose_ul.detach())
        return total, shares

    loss, parts = trainer(batch, contribution)
    if settings.lambda_anchor > 0:
        anchor = settings.lambda_anchor * anchor_loss(lora_parameters(context.model), reference)
        anchor.backward()
        loss += float(anchor.detach())
    return loss, parts


def end_of_turn_ids(context: ClientContext) -> torch.Tensor:
    """Every id the sampler stops on: never pushed down, a wrong answer ends like a right one."""
    return torch.tensor(sorted(eos_token_ids(context.model, context.prompts.tokenizer)), device=context.device)


def train(context: ClientContext, work: ClientRound, traces: Traces) -> dict:
    """S optimizer steps, each on B wins and B losses drawn at random; returns training metrics."""
    settings = context.config.spear
    reference = {name: p.detach().clone() for name, p in lora_parameters(context.model).items()}  # theta_global

    def step_gradient(rng, step, trainer):
        wins, losses = draw(traces.wins, settings.batch_size, rng), draw(traces.losses, settings.batch_size, rng)
        return spear_step(context, trainer, wins, losses, reference)

    return {"lose_unlikelihood": 0.0, **train_steps(context, work, context.config.budget("spear").local_steps, step_gradient)}


def client_update(context: ClientContext, work: ClientRound) -> ClientResult:
    """One SPEAR round on one client; weight = the prompts trained on, 0 when there is no win to learn from."""
    return client_round(context, work, context.config.budget("spear").prompts_per_round, collect, train)
