"""What every client update receives and returns, and the envelope every client round runs in.

`client_round` does what every algorithm's round shares: the timer and peak-memory window, loading the
global adapter, drawing the round's prompts, sampling and judging through one `Sampler` that counts the
cost, the skip when there is nothing to learn from (weight 0, the global adapter returned), and the
metrics every reply carries (`REPORTED_METRICS`). An algorithm supplies only how it collects what to
learn from (`Collect`) and how it trains on it (`Train`).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

import numpy as np
import torch

from spearfl.data.prompts import PromptFormat
from spearfl.data.schema import Example
from spearfl.feedback.providers import Feedback, FeedbackProvider
from spearfl.lm.forward import plain_output_layer
from spearfl.lm.generation import Completion, SamplingSettings, generate
from spearfl.lm.memory import (
    StepPlan,
    generation_cache_bytes,
    measure_activation_costs,
    plan_step,
    prefix_cache_bytes,
    release_free_memory,
    working_memory_mb,
)
from spearfl.lm.models import get_adapter_state, set_adapter_state, trainable_parameters
from spearfl.lm.prefix_cache import PrefixCache
from spearfl.lm.training import (
    CompletionBatch,
    Contribution,
    accumulate_gradients,
    make_optimizer,
    optimizer_step,
)
from spearfl.seeds import derive_seed


@dataclass
class ClientContext:
    """What a client process holds across rounds: the one base model with LoRA, prompt format, feedback, config."""

    model: Any  # a peft model; only its adapter weights change between clients
    prompts: PromptFormat
    feedback: FeedbackProvider
    config: Any  # spearfl.config.RunConfig
    device: torch.device
    progress: Any = None  # a live rich Progress to show generation on, if any
    step_constraint: Any = None  # spearfl.lm.training.StepConstraint: in simulation, an attack's, around every step


@dataclass
class ClientRound:
    """One client's work order for one round."""

    client_id: int
    round_index: int
    examples: list[Example]  # the client's pool, or its pending live interactions
    global_state: dict[str, torch.Tensor]
    lr: float
    run_seed: int
    personal: "PersonalPass | None" = None  # the client's own adapter trained beside (spearfl.personal)

    def seed(self, purpose: str) -> int:
        return derive_seed(self.run_seed, self.round_index, self.client_id, purpose)


@dataclass
class PersonalPass:
    """A second training of the round's collected data, from the client's personal adapter (Ditto, TAP): the same
    prompts, samples and feedback, so the round's budget is unchanged, only its optimizer steps taken twice.

    start(context, trained) gives the adapter to train from, once the global update is trained (`trained`: its
    adapter, or the global one when the round trained nothing); constraint: a projection around every step of
    the pass (Ditto's proximal pull). The pass writes the trained personal adapter to `state`, its metrics to
    `metrics`; a round with nothing to learn from leaves `state` None."""

    start: Callable[["ClientContext", dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    constraint: Any = None
    state: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # what `start` decided (TAP: the modules it replaced)


@dataclass
class ClientResult:
    """The trained adapter, its aggregation weight (0 = contributes nothing) and the round's metrics."""

    state: dict[str, torch.Tensor]
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class ClientUpdate(Protocol):
    """An algorithm's client round: the work order in, the trained adapter, its weight and its metrics out."""

    def __call__(self, context: ClientContext, work: ClientRound) -> ClientResult: ...


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: the accelerator's counter, or on Linux the process's peak resident set."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # resets VmHWM to the current resident set
    except OSError:
        pass  # not Linux: peak_memory_mb then reports the process's lifetime peak


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or peak resident set of the process, since the last reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sample_examples(examples: list[Example], count: int, seed: int) -> list[Example]:
    """Draw `count` prompts from the pool, without replacement while the pool lasts."""
    rng = np.random.default_rng(seed)
    if count <= len(examples):
        indices = rng.choice(len(examples), size=count, replace=False)
    else:
        indices = rng.choice(len(examples), size=count, replace=True)
    return [examples[int(index)] for index in indices]


class Sampler:
    """Samples and judges completions for one client round with the run's sampling settings, counting the cost.

    Every completion a round samples goes through here, so `metrics` covers them all: completions,
    generated tokens, hints the leak filter held back, and the seconds spent decoding and judging.
    """

    def __init__(self, context: ClientContext, work: ClientRound):
        self.context, self.work = context, work
        settings = context.config.generation
        working_mb = working_memory_mb(context.config.client.memory_budget_mb, context.model, context.device)
        self.sampling = SamplingSettings(
            settings.max_new_tokens, settings.temperature, settings.top_p, settings.batch_size,
            text_prefix=context.prompts.prefix, cache_bytes=generation_cache_bytes(working_mb),
        )
        self.counts = {"generations": 0, "generated_tokens": 0, "hints_dropped": 0}
        self.seconds = {"generation_seconds": 0.0, "feedback_seconds": 0.0}

    def __call__(
        self, prompts: list[list[int]], examples: list[Example], purpose: str, what: str, prefixes: PrefixCache | None = None
    ) -> tuple[list[Completion], list[Feedback]]:
        """One completion per prompt, seeded by (round, client, `purpose`), and its feedback.

        prefixes: states of this round's earlier prompts, for prompts that begin with them (a revision).
        """
        context = self.context
        started = time.perf_counter()
        context.model.eval()
        release_free_memory()  # what the last batch of prompts freed (their caches, states no longer kept)
        completions = generate(
            context.model, context.prompts.tokenizer, prompts, settings=self.sampling, seed=self.work.seed(purpose),
            progress=context.progress or False, description=f"client {self.work.client_id} {what}", prefixes=prefixes,
        )
        generated = time.perf_counter()
        feedback = [
            context.feedback(example, context.prompts.answer_text(completion.text))
            for example, completion in zip(examples, completions)
        ]
        self.seconds["generation_seconds"] += generated - started
        self.seconds["feedback_seconds"] += time.perf_counter() - generated
        self.counts["generations"] += len(completions)
        self.counts["generated_tokens"] += sum(len(completion.token_ids) for completion in completions)
        self.counts["hints_dropped"] += sum(verdict.hint_dropped for verdict in feedback)
        return completions, feedback

    def metrics(self) -> dict[str, float]:
        return self.counts | self.seconds


@dataclass
class Collected:
    """What a round collected to learn from, its aggregation weight if trained on (0: skip), and its metrics.

    The weight follows one rule for every method: the number of the round's prompts whose outcome enters
    the training loss with a nonzero coefficient (SPEAR: a win or a kept loss; feedback-SFT: a win; GRPO
    and RLTF-SD: a group with nonzero advantages; OPSD: every sampled prompt). This is FedAvg's n_k, the
    examples a client trained on, counted in prompts because every method is given the same prompts: a
    client that learned from more of its prompts moves the average more, and a round that learned from
    none weighs 0, so a stale copy of the global adapter never dilutes the others.

    metrics must hold `first_try_correct`: how many first attempts the feedback judged correct.
    """

    data: Any
    weight: float
    metrics: dict[str, float]


Collect = Callable[[ClientContext, ClientRound, Sampler, list[Example], list[list[int]]], Collected]
Train = Callable[[ClientContext, ClientRound, Any], dict[str, float]]

# Metrics every client update reports, whatever its algorithm; the server's history and reply checks read
# these. Algorithms add their own (wins, losses, revised_correct, ...) beside them.
REPORTED_METRICS = (
    "prompts", "first_try_correct", "generations", "generated_tokens", "trained_tokens", "scored_tokens",
    "seconds", "peak_memory_mb", "skipped",
)


def client_round(context: ClientContext, work: ClientRound, num_prompts: int, collect: Collect, train: Train) -> ClientResult:
    """One client round of any algorithm: draw `num_prompts` prompts, collect, train unless the weight is 0."""

    def gather(sampler: Sampler) -> tuple[int, Collected]:
        examples = sample_examples(work.examples, num_prompts, work.seed("prompts"))
        prompts = [context.prompts.task(example) for example in examples]
        return len(prompts), collect(context, work, sampler, examples, prompts)

    return envelope(context, work, gather, train)


def envelope(
    context: ClientContext, work: ClientRound, gather: Callable[[Sampler], tuple[int, Collected]], train: Train
) -> ClientResult:
    """What every client round shares: the timer and memory window, the global adapter loaded, what to learn from
    gathered (sampled and judged here, or read from a store of people's judged answers), training unless the
    weight is 0, and the metrics every reply carries. `gather(sampler)` returns (prompts, Collected)."""
    started = time.perf_counter()
    release_free_memory()
    reset_peak_memory(context.device)
    set_adapter_state(context.model, work.global_state)
    sampler = Sampler(context, work)
    num_prompts, collected = gather(sampler)
    generation_peak = peak_memory_mb(context.device)  # sampling, judging and any scoring before training
    metrics = {"prompts": num_prompts, "trained_tokens": 0, "scored_tokens": 0, "training_seconds": 0.0}
    metrics |= sampler.metrics() | collected.metrics
    metrics["first_try_accuracy"] = metrics["first_try_correct"] / num_prompts if num_prompts else float("nan")
    state = work.global_state
    training_peak = 0.0
    if collected.weight > 0:
        release_free_memory()
        reset_peak_memory(context.device)
        training_started = time.perf_counter()
        metrics |= train(context, work, collected.data)
        metrics["training_seconds"] = time.perf_counter() - training_started
        state = get_adapter_state(context.model)
        if work.personal is not None:
            train_personal(context, work, train, collected.data, state)
        training_peak = peak_memory_mb(context.device)
    metrics |= {"skipped": int(collected.weight == 0), "seconds": time.perf_counter() - started}
    metrics |= {
        "generation_peak_memory_mb": generation_peak,
        "training_peak_memory_mb": training_peak,
        "peak_memory_mb": max(generation_peak, training_peak),
    }
    return ClientResult(state=state, weight=collected.weight, metrics=metrics)


def train_personal(context: ClientContext, work: ClientRound, train: Train, data: Any, trained: dict[str, torch.Tensor]) -> None:
    """The round's `PersonalPass`: its start adapter set, the round's data trained on again under its constraint."""
    personal = work.personal
    set_adapter_state(context.model, personal.start(context, trained))
    outer = context.step_constraint
    context.step_constraint = personal.constraint if personal.constraint is not None else outer
    try:
        personal.metrics = train(context, work, data)
    finally:
        context.step_constraint = outer
    personal.state = get_adapter_state(context.model)


Item = TypeVar("Item")


def draw(items: list[Item], count: int, rng: np.random.Generator) -> list[Item]:
    """Up to `count` items without replacement (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int(index)] for index in rng.choice(len(items), size=count, replace=False)]


def pass_minibatches(num_items: int, num_steps: int, num_passes: int, rng: np.random.Generator) -> list[list[int]]:
    """Item indices of each optimizer step: `num_passes` shuffled passes over all items, the steps shared
    among the passes as evenly as they go, a pass's items split evenly among its steps.

    >>> [len(batch) for batch in pass_minibatches(10, 5, 2, np.random.default_rng(0))]
    [4, 3, 3, 5, 5]
    """
    batches = []
    for steps_in_pass in np.array_split(np.arange(num_steps), num_passes):
        order = rng.permutation(num_items)
        batches += [part.tolist() for part in np.array_split(order, min(len(steps_in_pass), num_items))]
    return batches


def round_prefix_cache(context: ClientContext) -> PrefixCache:
    """The prompt states a round keeps for its revisions, within the round's working memory."""
    working_mb = working_memory_mb(context.config.client.memory_budget_mb, context.model, context.device)
    return PrefixCache(max_bytes=prefix_cache_bytes(working_mb))


class Trainer:
    """Runs a round's optimizer steps within the client's memory budget: each step's batch through
    `accumulate_gradients` on the plan `spearfl.lm.memory.plan_step` makes for it, and what was chosen recorded."""

    def __init__(self, context: ClientContext):
        self.model, self.config = context.model, context.config
        self.costs = measure_activation_costs(context.model)
        self.working_mb = working_memory_mb(context.config.client.memory_budget_mb, context.model, context.device)
        self.plans: list[StepPlan] = []

    def __call__(
        self, batch: CompletionBatch, contribution: Contribution, logits: bool = False, logit_tensors: int = 4
    ) -> tuple[float, dict[str, float]]:
        """Accumulate the gradient of one step's loss, the sum of `contribution` over the plan's micro-batches.

        logits: the loss needs whole [rows, K, V] logits (`MicroBatch.logits`), `logit_tensors` of that size at
        once, rather than target log-probs only (`MicroBatch.logprobs`, which take the vocabulary in chunks)."""
        plan = plan_step(
            self.costs, batch.row_lengths(), batch.targets.shape[1], self.working_mb,
            chunkable=not logits and plain_output_layer(self.model), logit_tensors=logit_tensors,
            force_checkpoint=self.config.lora.checkpoint_activations,
        )
        self.plans.append(plan)
        return accumulate_gradients(self.model, batch, plan, contribution)

    def report(self) -> dict[str, float]:
        """What the round chose: the smallest micro-batch, the steps checkpointed, the largest estimate, the room."""
        if not self.plans:
            return {}
        return {
            "micro_batch_rows": min(plan.micro_batch_rows for plan in self.plans),
            "checkpointed_steps": sum(plan.checkpoint for plan in self.plans),
            "vocabulary_chunk": self.plans[0].vocabulary_chunk,
            "planned_working_mb": max(plan.estimated_mb for plan in self.plans),
            "working_memory_mb": self.working_mb,
            "plan_fits": int(all(plan.fits for plan in self.plans)),
        }


# step(rng, step, trainer): accumulate one step's gradient through `trainer`; returns the step's loss and its parts.
StepGradient = Callable[[np.random.Generator, int, Trainer], tuple[float, dict[str, float]]]


def train_steps(context: ClientContext, work: ClientRound, num_steps: int, step_gradient: StepGradient) -> dict[str, float]:
    """`num_steps` AdamW steps on the LoRA weights, fresh each round: its state never leaves the client.

    step_gradient(rng, step, trainer) accumulates a step's gradient through the round's `Trainer` (which fits it
    into the memory budget) and returns its loss and parts; batches are drawn from `rng` and dropout from a torch
    seed, both derived from (round, client). Returns the parts ending in "_tokens" summed and every other part,
    and `loss`, averaged over the steps, `optimizer_steps`, and the memory plan (`Trainer.report`).
    """
    model = context.model
    release_free_memory()  # what generation freed goes back before the budget's room is measured
    trainer = Trainer(context)
    optimizer = make_optimizer(trainable_parameters(model), work.lr, context.config.optimizer.weight_decay)
    optimizer.zero_grad(set_to_none=True)
    rng = np.random.default_rng(work.seed("training-batches"))
    torch.manual_seed(work.seed("dropout"))
    totals: dict[str, float] = {"loss": 0.0}
    model.train()
    try:
        for step in range(num_steps):
            loss, parts = step_gradient(rng, step, trainer)
            optimizer_step(optimizer, trainable_parameters(model), context.config.optimizer.max_grad_norm, context.step_constraint)
            totals["loss"] += loss
            for key, value in parts.items():
                totals[key] = totals.get(key, 0) + value
    finally:
        model.eval()
        release_free_memory()
    averaged = {key: value if key.endswith("_tokens") else value / num_steps for key, value in totals.items()}
    return averaged | {"optimizer_steps": num_steps} | trainer.report()
