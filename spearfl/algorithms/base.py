"""What every client update receives and returns, shared by the local and the Flower runtimes."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from spearfl.data.prompts import PromptFormat
from spearfl.data.schema import Example
from spearfl.feedback.providers import Feedback, FeedbackProvider
from spearfl.lm.generation import Completion, generate
from spearfl.lm.models import trainable_parameters
from spearfl.lm.prefix_cache import PrefixCache
from spearfl.lm.training import make_optimizer, optimizer_step
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


@dataclass
class ClientRound:
    """One client's work order for one round."""

    client_id: int
    round_index: int
    examples: list[Example]  # the client's pool, or its pending live interactions
    global_state: dict[str, torch.Tensor]
    lr: float
    run_seed: int

    def seed(self, purpose: str) -> int:
        return derive_seed(self.run_seed, self.round_index, self.client_id, purpose)


@dataclass
class ClientResult:
    """The trained adapter, its aggregation weight (0 = contributes nothing) and the round's metrics."""

    state: dict[str, torch.Tensor]
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class ClientUpdate(Protocol):
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


def sample_and_judge(
    context: ClientContext,
    prompts: list[list[int]],
    examples: list[Example],
    seed: int,
    description: str = "generating",
    prefixes: PrefixCache | None = None,
) -> tuple[list[Completion], list[Feedback], float]:
    """Sample one completion per prompt with the run's sampling settings and judge each.

    prefixes: states of this round's earlier prompts, for prompts that begin with them (a revision).
    Returns the completions, their feedback and the seconds spent judging.
    """
    settings = context.config.generation
    context.model.eval()
    completions = generate(
        context.model,
        context.prompts.tokenizer,
        prompts,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=seed,
        batch_size=settings.batch_size,
        text_prefix=context.prompts.prefix,
        progress=context.progress or False,
        description=description,
        prefixes=prefixes,
    )
    started = time.perf_counter()
    feedback = [
        context.feedback(example, context.prompts.answer_text(completion.text))
        for example, completion in zip(examples, completions)
    ]
    return completions, feedback, time.perf_counter() - started


StepLoss = Callable[[np.random.Generator, int], tuple[torch.Tensor, dict[str, float]]]


def train_steps(context: ClientContext, work: ClientRound, num_steps: int, step_loss: StepLoss) -> dict[str, float]:
    """`num_steps` AdamW steps on the LoRA weights, fresh each round: its state never leaves the client.

    step_loss(rng, step) returns a step's loss and its parts; batches are drawn from `rng` and dropout
    from a torch seed, both derived from (round, client). Returns the parts ending in "_tokens" summed
    and every other part, and `loss`, averaged over the steps.
    """
    model = context.model
    optimizer = make_optimizer(trainable_parameters(model), work.lr, context.config.optimizer.weight_decay)
    rng = np.random.default_rng(work.seed("training-batches"))
    torch.manual_seed(work.seed("dropout"))
    totals: dict[str, float] = {"loss": 0.0}
    model.train()
    try:
        for step in range(num_steps):
            loss, parts = step_loss(rng, step)
            optimizer_step(optimizer, loss, trainable_parameters(model), context.config.optimizer.max_grad_norm)
            totals["loss"] += float(loss.detach())
            for key, value in parts.items():
                totals[key] = totals.get(key, 0) + value
    finally:
        model.eval()
    return {key: value if key.endswith("_tokens") else value / num_steps for key, value in totals.items()}
