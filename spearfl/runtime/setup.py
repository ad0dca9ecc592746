"""What a run needs before its first round, on the server and on every client: a checked config, the data
split into a held-out set and client pools, and the client context around one loaded base model.

Both sides derive the same partition from the config and its seed, so a client on another machine trains
on exactly the pool the local simulation would give it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientContext
from spearfl.config import ConfigError, ModelConfig, RunConfig, TaskConfig
from spearfl.data import DATASETS, load_examples
from spearfl.data.prompts import ChatTemplateMissing, PromptFormat, uses_chat_template
from spearfl.data.schema import Example
from spearfl.data.sources import JSONL_PREFIX
from spearfl.data.split import dirichlet_partition, split_each_client, split_pool_heldout
from spearfl.feedback import verifiers
from spearfl.feedback.hints import HINT_STYLES
from spearfl.feedback.providers import make_oracle, make_provider
from spearfl.lm.models import attach_lora, checkpoint_lora_layers, load_base_model
from spearfl.seeds import SERVER_CLIENT_ID, derive_seed


def check_config(config: RunConfig) -> None:
    """Raise ConfigError naming the field whose value no registry knows."""
    if config.algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm: unknown {config.algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    for index, dataset in enumerate(config.data.datasets):
        field = f"data.tasks[{index}].dataset" if config.data.tasks else "data.dataset"
        if dataset.startswith(JSONL_PREFIX):
            if not Path(dataset.removeprefix(JSONL_PREFIX)).is_file():
                raise ConfigError(f"{field}: file not found: {dataset.removeprefix(JSONL_PREFIX)}")
        elif dataset not in DATASETS:
            raise ConfigError(f"{field}: unknown {dataset!r}; choose one of {sorted(DATASETS)} or jsonl:<path>")
    if config.feedback.hint not in HINT_STYLES:
        raise ConfigError(f"feedback.hint: unknown {config.feedback.hint!r}; choose one of {sorted(HINT_STYLES)}")
    if config.feedback.provider not in ("oracle", "judge"):
        verdict_for(config)  # a bad pattern or an unknown function stops the run before any work
    devices = config.live.devices
    if config.server.rounds is None and not (devices or config.live.on_flower):
        raise ConfigError("server.rounds: null (until stopped) is for live devices; set live.devices or a number of rounds")
    if devices and len(devices) != config.data.num_clients:
        raise ConfigError(f"live.devices: {len(devices)} devices, but data.num_clients is {config.data.num_clients}")
    if (devices or config.live.on_flower) and config.algorithm != "spear":
        raise ConfigError(f"algorithm: {config.algorithm!r} cannot learn from people's verdicts; live devices run spear")


@dataclass
class Federation:
    """The data side of a run: held-out set and each client's pool."""

    heldout: list[Example]
    clients: list[list[Example]]  # each client's training pool
    client_heldout: list[list[Example]] = dataclasses.field(default_factory=list)  # each client's own held-out set
    client_validation: list[list[Example]] = dataclasses.field(default_factory=list)  # each client's validation split


def with_label_style(examples: list[Example], label_style: str | None) -> list[Example]:
    """The examples with multiple-choice labels restyled as configured (data.label_style), or as they are."""
    if not label_style:
        return examples
    return [
        dataclasses.replace(example, label_style=label_style) if example.is_multiple_choice else example
        for example in examples
    ]


def prepare_data(config: RunConfig) -> Federation:
    """Load the dataset, split off the held-out set, partition the pool among clients, and split off each client's
    own held-out set (data.client_heldout_fraction) and validation split (personal.validation_fraction).

    A multi-task federation (data.tasks) does this task by task: each task's held-out set and its clients' label-skewed
    pools, clients numbered in the order the tasks are listed; the global held-out set is the tasks' sets together.
    """
    data = config.data
    tasks = data.tasks or [TaskConfig(dataset=data.dataset, clients=data.num_clients)]
    heldout, clients = [], []
    for index, task in enumerate(tasks):
        examples = with_label_style(load_examples(task.dataset), task.label_style or data.label_style)
        pool, task_heldout = split_pool_heldout(examples, data.heldout_size, seed=data.split_seed)
        try:
            task_clients = dirichlet_partition(
                pool,
                num_clients=task.clients,
                alpha=data.dirichlet_alpha,
                min_per_client=data.min_per_client,
                max_per_client=data.max_per_client,
                # a single task keeps the seed it always had, so runs from before tasks existed split the same
                seed=config.seed if not data.tasks else derive_seed(config.seed, index, SERVER_CLIENT_ID, "task-partition"),
            )
        except ValueError as error:
            where = f"data.tasks[{index}] ({task.dataset})" if data.tasks else "data"
            raise ConfigError(f"{where}: {error}") from None
        heldout += task_heldout
        clients += task_clients
    # The validation split is cut wherever clients are scored on their own data, whichever the method, so that
    # every method of a comparison trains on the same pools; TAP alone reads it.
    validating = config.data.client_heldout_fraction > 0 or config.personal.method == "tap"
    try:
        clients, client_heldout = split_each_client(clients, config.data.client_heldout_fraction, seed=config.seed)
        if validating:
            clients, client_validation = split_each_client(clients, config.personal.validation_fraction, seed=config.seed + 1)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return Federation(heldout, clients, client_heldout, client_validation if validating else [])


def build_context(config: RunConfig, model=None, tokenizer=None) -> ClientContext:
    """Load the base model once (unless given), attach LoRA, and build the feedback provider."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if model is None:
        model, tokenizer = load_base_model(config.model)
    return client_context(config, attach_configured_lora(model, config), tokenizer)


def attach_configured_lora(model, config: RunConfig):
    """The base model wrapped with the configured LoRA adapter, initialised from the run seed."""
    peft_model = attach_lora(model, config.lora, seed=derive_seed(config.seed, 0, SERVER_CLIENT_ID, "lora-init"))
    if config.lora.checkpoint_activations:
        checkpoint_lora_layers(peft_model)
    return peft_model


def prompt_format_for(config: RunConfig, tokenizer) -> PromptFormat:
    """How this run's prompts are written and encoded (config.prompt), checked against the tokenizer."""
    prompt_format = PromptFormat(tokenizer, config.prompt.answer_prefix, config.prompt.reasoning, config.prompt.chat_template)
    try:
        uses_chat_template(tokenizer, config.prompt.chat_template)
    except ChatTemplateMissing as error:
        raise ConfigError(str(error)) from None
    return prompt_format


def client_context(config: RunConfig, peft_model, tokenizer) -> ClientContext:
    """What a client update needs around a loaded model: prompt format, feedback provider, config, device."""
    device = next(peft_model.parameters()).device
    return ClientContext(peft_model, prompt_format_for(config, tokenizer), client_feedback(config), config, device)


def client_feedback(config: RunConfig):
    """The simulated user of this config: its verdicts from `feedback.provider`, with the hint style, reminders
    and answer parsing of the oracle."""
    feedback = config.feedback
    if feedback.provider == "oracle":
        return make_oracle(feedback.hint, feedback.max_hint_sentences, feedback.remind_format, last_answer=config.prompt.reasoning)
    return make_provider(verdict_for(config), feedback.hint, feedback.max_hint_sentences, feedback.remind_format, config.prompt.reasoning)


def verdict_for(config: RunConfig):
    """The verdict function of a provider other than the oracle; ConfigError when it cannot be built."""
    feedback = config.feedback
    if feedback.provider == "judge":
        judge_model = config.model.model_copy(update={"name": feedback.judge_model})
        return loaded_judge(judge_model.model_dump_json(), feedback.rubric, config.prompt.chat_template)
    try:
        return {
            "numeric": lambda: verifiers.numeric(feedback.tolerance),
            "exact": lambda: verifiers.exact,
            "math": lambda: verifiers.math_equivalent,
            "regex": lambda: verifiers.regex(feedback.pattern),
            "python": lambda: verifiers.python_function(feedback.function),
        }[feedback.provider]()
    except (ValueError, TypeError, re.error) as error:
        raise ConfigError(f"feedback.{'function' if feedback.provider == 'python' else 'pattern'}: {error}") from None




@functools.lru_cache(maxsize=2)
def loaded_judge(model_json: str, rubric: str | None, chat_template: str):
    """The judge model (its ModelConfig as JSON), loaded once per process however many client contexts ask."""
    from spearfl.feedback.judge import (
        Judge,  # a second model: loaded only when a config asks for a judge
    )

    model, tokenizer = load_base_model(ModelConfig.model_validate_json(model_json))
    return Judge(model, tokenizer, rubric, chat_template)
