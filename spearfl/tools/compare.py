"""Compare client updates on one config: every (algorithm, seed) pair in its own run folder, one table, two plots.

Only `algorithm`, `seed` and `output_dir` change between pairs, so clients, partitions, the per-(round, client)
seeds of each run seed, the feedback provider and the held-out evaluation are the same for every algorithm.
Runs go to DIR/<algorithm>/seed<run seed>; a complete folder is read back, an incomplete one resumes.
The table and plots are computed from the folders' summary.json and history.jsonl only.

The methods share seeds, so their runs pair by run seed (`paired`: SPEAR minus each baseline, seed by seed,
with a 95% paired t interval).

The base model loads once: each run gets it wrapped in a fresh LoRA adapter initialised from that run's seed,
after the previous run's LoRA layers are removed (peft's unload, no merge; the base weights are never trained),
so a run starts exactly as it would in a process of its own.

Left out: running pairs in parallel (one model, one process).
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from spearfl.algorithms import ALGORITHMS, CONFIG_SECTIONS
from spearfl.algorithms.base import ClientContext
from spearfl.config import (
    BUDGET_FIELDS,
    ConfigError,
    RunConfig,
    config_to_dict,
    validate,
)
from spearfl.io import atomic_write_bytes, atomic_write_text
from spearfl.lm.models import load_base_model
from spearfl.runtime.local import run_local
from spearfl.runtime.run_folder import RunFolder
from spearfl.runtime.server import check_run_folder
from spearfl.runtime.setup import build_context
from spearfl.tools.paired import (
    paired_csv,
    paired_markdown,
    paired_rows,
    reference_method,
)

# greedy generation; option log-likelihood (multiple choice), raw and length-normalised, after the listed options
# and as cloze continuations of the bare question
ACCURACY_METRICS = ("accuracy", "loglik_accuracy", "loglik_norm_accuracy", "cloze_accuracy", "cloze_norm_accuracy")
FORMAT_FREE_METRIC = "loglik_accuracy"  # shown first: scoring the options does not depend on the answer format
COST_COLUMNS = {  # key -> (title, decimals)
    "generations_per_prompt": ("generations / prompt", 2),
    "generated_tokens": ("generated tokens", 0),
    "trained_tokens": ("trained tokens", 0),
    "client_seconds": ("client s", 1),
    "peak_memory_mb": ("peak MB", 0),
    "upload_bytes_per_client_round": ("upload B / client round", 0),
}
CAPTION = (
    "Held-out accuracy after the last round, and the best over the evaluated rounds after round 0, as mean ± sample "
    "standard deviation over seeds (`accuracy`: greedy generation; `loglik_accuracy`: option log-likelihood after the "
    "listed options; `cloze_accuracy`: each option's text continuing the bare question; `_norm`: the same with "
    "length-normalised log-likelihoods). "
    "Costs are the mean over seeds of each run's totals: generations / prompt = sampled completions over prompts, "
    "summed over client rounds; tokens = generated tokens (every sampled completion, revisions included) and trained "
    "tokens (every forward pass with a backward pass); client s = client wall-clock seconds. Peak MB is the maximum "
    "over seeds and client rounds (GPU: allocated since the client round began; CPU on Linux: the process's peak "
    "resident set since the client round began, which includes the base model). Upload B / client "
    "round = adapter bytes uploaded, summed over the run, divided by all client rounds, skipped ones (which upload "
    "nothing) included."
)
PLOTS = {"round": "accuracy_by_round.png", "compute": "accuracy_by_compute.png"}


def parse_names(text: str, known, option: str, noun: str) -> list[str]:
    """Comma-separated names, each in `known` and listed once; ConfigError names `option` and the first bad one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"{option}: name at least one {noun}")
    for index, name in enumerate(names):
        if name not in known:
            raise ConfigError(f"{option}: unknown {name!r}; choose from {sorted(known)}")
        if name in names[:index]:
            raise ConfigError(f"{option}: {name!r} is listed twice")
    return names


def parse_algorithms(text: str) -> list[str]:
    """Comma-separated algorithm names, each registered and listed once; ConfigError names the first bad one."""
    return parse_names(text, ALGORITHMS, "--algorithms", "algorithm")


def default_output_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / "compare"


def run_seeds(config: RunConfig, num_seeds: int) -> list[int]:
    """The config's seed and the next ones: seed 0 with --seeds 3 gives runs 0, 1, 2."""
    return [config.seed + offset for offset in range(num_seeds)]


def pair_config(config: RunConfig, algorithm: str, seed: int, output_dir: Path) -> RunConfig:
    """The shared config with only the algorithm, the seed and the run folder changed."""
    folder = Path(output_dir) / algorithm / f"seed{seed}"
    return validate({**config_to_dict(config), "algorithm": algorithm, "seed": seed, "output_dir": str(folder)})


class SharedBaseModel:
    """The base model, loaded on first use; each run's context wraps it in a fresh LoRA adapter."""

    def __init__(self) -> None:
        self.peft_model = None
        self.tokenizer = None

    def context_for(self, config: RunConfig) -> ClientContext:
        if self.peft_model is None:
            model, self.tokenizer = load_base_model(config.model)
        else:
            # attach_lora edits the model in place; removing the LoRA layers gives back the untouched base model
            model = self.peft_model.unload()
        context = build_context(config, model, self.tokenizer)
        self.peft_model = context.model
        return context


def check_equal_budgets(config: RunConfig, algorithms: list[str]) -> None:
    """Refuse a comparison whose methods would get different client budgets (prompts, optimizer steps a round).

    Learning rate, schedule and tokens per completion are one field each for every method, so only a method's
    own `prompts_per_round` / `local_steps` can set it apart; ConfigError names those fields.
    """
    budgets = {algorithm: config.budget(CONFIG_SECTIONS[algorithm]) for algorithm in algorithms}
    first = algorithms[0]
    differing = [
        f"{CONFIG_SECTIONS[algorithm]}.{name}={getattr(budget, name)} ({algorithm}) vs {getattr(budgets[first], name)} ({first})"
        for algorithm, budget in budgets.items()
        for name in BUDGET_FIELDS
        if getattr(budget, name) != getattr(budgets[first], name)
    ]
    if differing:
        raise ConfigError(
            "the compared methods get different client budgets: " + "; ".join(differing)
            + "; give every method the same budget (the client section) or run the ablation on its own with spearfl run"
        )


def check_folders(pairs: list[RunConfig]) -> None:
    """Refuse before any run starts when a pair's folder holds a different run (say, other --set values)."""
    for pair in pairs:
        check_run_folder(RunFolder(pair.output_dir), pair)


def run_pairs(
    config: RunConfig, algorithms: list[str], seeds: list[int], output_dir: Path, show_progress: bool = True
) -> dict[str, list[RunFolder]]:
    """Run or resume every (algorithm, seed) pair; complete folders are read back, not rerun."""
    pairs = [pair_config(config, algorithm, seed, output_dir) for algorithm in algorithms for seed in seeds]
    run_configs(pairs, show_progress)
    folders: dict[str, list[RunFolder]] = {}
    for pair in pairs:
        folders.setdefault(pair.algorithm, []).append(RunFolder(pair.output_dir))
    return folders


def run_configs(configs: list[RunConfig], show_progress: bool = True) -> None:
    """Run or resume every config in its own folder, in order, on one base model loaded once; complete folders
    are read back, not rerun. Refuses before the first run if a folder holds a different run."""
    check_folders(configs)
    base_model = SharedBaseModel()
    base_evals: dict[str, dict] = {}  # the base model's held-out figures, evaluated once for every run
    for config in configs:
        # a complete folder is read back by run_local without a model
        context = None if RunFolder(config.output_dir).is_complete() else base_model.context_for(config)
        run_local(config, show_progress=show_progress, context=context, base_evals=base_evals)


@dataclass(frozen=True)
class Curve:
    """One run's held-out metric at its evaluated rounds, and the client tokens spent up to each."""

    rounds: list[int]
    values: list[float]
    tokens: list[int]  # generated + trained tokens, cumulative over rounds 1..round


def accuracy_curve(history: list[dict], metric: str) -> Curve:
    rounds, values, tokens, spent = [], [], [], 0
    for row in history:
        online = row.get("online") or {}
        spent += online.get("generated_tokens", 0) + online.get("trained_tokens", 0)
        if "eval" in row:
            rounds.append(row["round"])
            values.append(row["eval"][metric])
            tokens.append(spent)
    return Curve(rounds, values, tokens)


def run_measures(summary: dict, history: list[dict], metrics: list[str]) -> dict[str, float]:
    """One run's row: final and best held-out metrics, and its exact cost counters."""
    clients = [client for row in history for client in row["clients"]]
    measures = {}
    for metric in metrics:
        measures[metric] = summary["after"][metric]
        measures[f"best_{metric}"] = max(row["eval"][metric] for row in history if "eval" in row and row["round"] > 0)
    return measures | {
        "generations_per_prompt": sum(c["metrics"]["generations"] for c in clients) / sum(c["metrics"]["prompts"] for c in clients),
        "generated_tokens": summary["generated_tokens"],
        "trained_tokens": summary["trained_tokens"],
        "client_seconds": summary["client_seconds"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "upload_bytes_per_client_round": summary["upload_bytes"] / len(clients),
    }


def sample_std(values: list[float]) -> float | None:
    """Sample standard deviation (n - 1); None for a single run."""
    return statistics.stdev(values) if len(values) > 1 else None


def algorithm_row(algorithm: str, runs: list[dict[str, float]], metrics: list[str]) -> dict:
    """Accuracies as mean and sample spread over seeds, costs as the mean, peak memory as the maximum."""
    row: dict = {"algorithm": algorithm, "num_seeds": len(runs)}
    for metric in metrics:
        for key in (metric, f"best_{metric}"):
            values = [run[key] for run in runs]
            row[f"{key}_mean"], row[f"{key}_std"] = statistics.mean(values), sample_std(values)
    for key in COST_COLUMNS:
        values = [run[key] for run in runs]
        row[key] = max(values) if key == "peak_memory_mb" else statistics.mean(values)
    return row


def shared_metrics(summaries: list[dict]) -> list[str]:
    """The accuracy metrics every run reports, the format-free one first."""
    metrics = [metric for metric in ACCURACY_METRICS if all(metric in summary["after"] for summary in summaries)]
    return sorted(metrics, key=lambda metric: metric != FORMAT_FREE_METRIC)  # stable: the others keep their order


def comparison_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def table_cells(row: dict, metrics: list[str]) -> list[str]:
    """Display cells of one algorithm: accuracies as `mean ± std`, costs rounded."""
    cells = [row["algorithm"], str(row["num_seeds"])]
    for metric in metrics:
        for key in (metric, f"best_{metric}"):
            spread = row[f"{key}_std"]
            cells.append(f"{row[f'{key}_mean']:.3f}" + ("" if spread is None else f" ± {spread:.3f}"))
    cells += [f"{row[key]:,.{decimals}f}" for key, (_, decimals) in COST_COLUMNS.items()]
    return cells


def column_titles(metrics: list[str]) -> list[str]:
    accuracy_titles = [title for metric in metrics for title in (metric, f"best {metric}")]
    return ["algorithm", "seeds", *accuracy_titles, *(title for title, _ in COST_COLUMNS.values())]


def comparison_markdown(rows: list[dict], metrics: list[str]) -> str:
    titles = column_titles(metrics)
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] + ["---:"] * (len(titles) - 1)) + "|"]
    lines += ["| " + " | ".join(table_cells(row, metrics)) + " |" for row in rows]
    figures = [f"![held-out accuracy by {axis}]({name})" for axis, name in PLOTS.items()]
    return "# Comparison\n\n" + "\n".join(lines) + f"\n\n{CAPTION}\n\n" + "\n\n".join(figures) + "\n"


def comparison_table(rows: list[dict], metrics: list[str]) -> Table:
    """The comparison for the terminal: one column per algorithm, so it stays narrow."""
    table = Table(
        title="comparison: held-out accuracy (mean ± sample std over seeds) and client costs",
        caption="columns are defined in comparison.md",
    )
    table.add_column("")
    for row in rows:
        table.add_column(row["algorithm"], justify="right")
    cells = [table_cells(row, metrics) for row in rows]
    for index, title in enumerate(column_titles(metrics)[1:], start=1):
        table.add_row(title, *(algorithm_cells[index] for algorithm_cells in cells))
    return table


def plot_curves(curves: dict[str, list[Curve]], metrics: list[str], axis: str, path: Path) -> None:
    """PNG, one panel per metric: mean over seeds per algorithm, shaded ± one sample standard deviation.

    axis: "round" or "compute" (mean over seeds of the cumulative generated + trained tokens).
    """
    figure = Figure(figsize=(6 * len(metrics), 4.5), layout="constrained")
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for algorithm, runs in curves.items():
            per_run = [run[metric] for run in runs]
            x = per_run[0].rounds if axis == "round" else [statistics.mean(t) for t in zip(*(c.tokens for c in per_run))]
            by_round = list(zip(*(c.values for c in per_run)))  # [rounds][seeds]
            mean = [statistics.mean(values) for values in by_round]
            axes.plot(x, mean, marker="o", markersize=3, label=algorithm)
            if len(per_run) > 1:
                spread = [statistics.stdev(values) for values in by_round]
                low, high = [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)]
                axes.fill_between(x, low, high, alpha=0.2)
        axes.set_xlabel("round" if axis == "round" else "cumulative client tokens (generated + trained)")
        if axis == "round":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(f"held-out {metric}")
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"Held-out accuracy by {axis}: mean over seeds, band ± 1 sample std")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass(frozen=True)
class Comparison:
    """What `compare` tabulated: per-method rows, the accuracy metrics, and the paired differences."""

    rows: list[dict]
    metrics: list[str]
    reference: str
    paired: list[dict]


def write_comparison(folders: dict[str, list[RunFolder]], output_dir: Path) -> Comparison:
    """comparison.csv, paired.csv, comparison.md and the two plots from the run folders."""
    runs = {
        algorithm: [(f.read_config()["seed"], f.read_summary(), f.read_history()) for f in group]
        for algorithm, group in folders.items()
    }
    metrics = shared_metrics([summary for group in runs.values() for _, summary, _ in group])
    rows = [
        algorithm_row(algorithm, [run_measures(summary, history, metrics) for _, summary, history in group], metrics)
        for algorithm, group in runs.items()
    ]
    reference = reference_method(list(runs))
    finals = {algorithm: {seed: summary["after"] for seed, summary, _ in group} for algorithm, group in runs.items()}
    paired = paired_rows(finals, metrics, reference)
    atomic_write_text(output_dir / "comparison.csv", comparison_csv(rows))
    atomic_write_text(output_dir / "paired.csv", paired_csv(paired))
    markdown = comparison_markdown(rows, metrics) + "\n" + paired_markdown(paired, reference)
    atomic_write_text(output_dir / "comparison.md", markdown)
    curves = {
        algorithm: [{metric: accuracy_curve(history, metric) for metric in metrics} for _, _, history in group]
        for algorithm, group in runs.items()
    }
    for axis, name in PLOTS.items():
        plot_curves(curves, metrics, axis, output_dir / name)
    return Comparison(rows, metrics, reference, paired)


def compare(
    config: RunConfig, algorithms: list[str], num_seeds: int, output_dir: Path | None = None, show_progress: bool = True
) -> Comparison:
    """Run or resume every pair, then write the comparison files into `output_dir`."""
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(config)
    check_equal_budgets(config, algorithms)
    folders = run_pairs(config, algorithms, run_seeds(config, num_seeds), output_dir, show_progress)
    return write_comparison(folders, output_dir)
