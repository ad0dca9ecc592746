"""Checks of a config against the registries (datasets, hint styles, algorithms), before any work starts."""

from __future__ import annotations

from pathlib import Path

from spearfl.algorithms import ALGORITHMS
from spearfl.config import ConfigError, RunConfig
from spearfl.data import DATASETS
from spearfl.feedback import HINT_STYLES


def check_config(config: RunConfig) -> None:
    """Raise ConfigError naming the field whose value no registry knows."""
    if config.algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm: unknown {config.algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    dataset = config.data.dataset
    if dataset.startswith("jsonl:"):
        if not Path(dataset.removeprefix("jsonl:")).is_file():
            raise ConfigError(f"data.dataset: file not found: {dataset.removeprefix('jsonl:')}")
    elif dataset not in DATASETS:
        raise ConfigError(f"data.dataset: unknown {dataset!r}; choose one of {sorted(DATASETS)} or jsonl:<path>")
    if config.feedback.hint not in HINT_STYLES:
        raise ConfigError(f"feedback.hint: unknown {config.feedback.hint!r}; choose one of {sorted(HINT_STYLES)}")
