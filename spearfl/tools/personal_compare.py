"""Compare personalization methods (`personal.method`) on one config, scored on each client's own held-out data.

Every (method, seed) pair runs in its own folder, DIR/<method>/seed<run seed>, with only `personal.method`, `seed`
and `output_dir` changed, so each seed's partitions, validation and held-out splits, and first attempts are the
same for every method; a complete folder is read back, an incomplete one resumes (as `spearfl compare` does).

What a client's person is answered with is its personal adapter where the method keeps one, else the global
adapter: that is the adapter each method is scored with here (`served`). For every run, over the clients:
- the mean of the clients' own held-out accuracy, and the worst client's;
- the same clients under the run's own global adapter, and the largest drop of a client below it (`worst_drop`,
  the figure that selective replacement promises to keep small).
Paired differences (the reference, TAP when compared, minus each other method) pair each seed's mean over the
clients, with a 95% paired t interval over seeds (`spearfl.tools.paired`).

Left out: pairing client by client (the clients of one seed share its global adapter, so they are not
independent draws), and any correction for the number of comparisons.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from spearfl.config import ConfigError, RunConfig, config_to_dict, validate
from spearfl.io import atomic_write_text
from spearfl.personal import METHODS
from spearfl.runtime.run_folder import RunFolder, plot_grouped_bars
from spearfl.tools.compare import comparison_csv, parse_names, run_configs, run_seeds, sample_std
from spearfl.tools.paired import paired_csv, paired_markdown, paired_rows

PERSONAL_METRICS = ("accuracy", "loglik_accuracy")  # greedy answers, as people get them; option log-likelihood
MEASURES = ("mean", "worst", "global_mean", "worst_drop", "heldout")
MEASURE_TITLES = {
    "mean": "mean over clients",
    "worst": "worst client",
    "global_mean": "mean, run's global adapter",
    "worst_drop": "largest drop below global",
    "heldout": "global held-out set",
}
CAPTION = (
    "Each client's own held-out accuracy (data.client_heldout_fraction of its pool, never trained on) after the last "
    "round, scored with the adapter the method answers that client with: its personal adapter where the method keeps "
    "one, else the global adapter. `mean over clients` and `worst client` are over the clients of a run; "
    "`mean, run's global adapter` scores the same clients with that run's global adapter; `largest drop below "
    "global` is the largest amount by which a client's accuracy falls below its own global-adapter accuracy "
    "(negative: every client gained); `global held-out set` is the run's global adapter on the shared held-out "
    "set. Each figure is the mean ± sample standard deviation over seeds."
)


def parse_methods(text: str) -> list[str]:
    """Comma-separated personalization methods, each known and listed once; ConfigError names the first bad one."""
    return parse_names(text, METHODS, "--personal", "personalization method")


def reference_method(methods: list[str]) -> str:
    """The method every paired difference starts from: TAP when compared, else the first listed."""
    return "tap" if "tap" in methods else methods[0]


def pair_config(config: RunConfig, method: str, seed: int, output_dir: Path) -> RunConfig:
    """The shared config with only the personalization method, the seed and the run folder changed."""
    tree = config_to_dict(config)
    tree["personal"] = {**tree["personal"], "method": method}
    return validate({**tree, "seed": seed, "output_dir": str(Path(output_dir) / method / f"seed{seed}")})


def served(row: dict) -> dict:
    """A client's figures under the adapter its person is answered with: the personal one, else the global one."""
    return row.get("personal") or row["global"]


def run_figures(summary: dict, metric: str) -> dict[str, float]:
    """One run's per-client figures of `metric` (MEASURES), from its summary's last per-client evaluation."""
    rows = summary["clients"]["per_client"]
    scores = [served(row)[metric] for row in rows]
    globals_ = [row["global"][metric] for row in rows]
    return {
        "mean": statistics.mean(scores),
        "worst": min(scores),
        "global_mean": statistics.mean(globals_),
        "worst_drop": max(g - s for g, s in zip(globals_, scores)),
        "heldout": summary["after"][metric],
    }


def method_row(method: str, runs: list[dict[str, dict[str, float]]]) -> dict:
    """Mean and sample spread over seeds of each (metric, measure)."""
    row: dict = {"method": method, "num_seeds": len(runs)}
    for metric in PERSONAL_METRICS:
        for measure in MEASURES:
            values = [run[metric][measure] for run in runs]
            row[f"{metric}_{measure}_mean"], row[f"{metric}_{measure}_std"] = statistics.mean(values), sample_std(values)
    return row


def cell(row: dict, key: str) -> str:
    spread = row[f"{key}_std"]
    return f"{row[f'{key}_mean']:.3f}" + ("" if spread is None else f" ± {spread:.3f}")


def rows_markdown(rows: list[dict]) -> str:
    lines = []
    for metric in PERSONAL_METRICS:
        titles = ["method", "seeds", *(MEASURE_TITLES[measure] for measure in MEASURES)]
        lines += [f"### {metric}", "", "| " + " | ".join(titles) + " |", "|---|" + "---:|" * (len(titles) - 1)]
        lines += [
            "| " + " | ".join([row["method"], str(row["num_seeds"]), *(cell(row, f"{metric}_{m}") for m in MEASURES)]) + " |"
            for row in rows
        ]
        lines.append("")
    return "\n".join(lines)


def personal_table(rows: list[dict], metric: str = "accuracy") -> Table:
    """The comparison for the terminal: one column per method, one row per measure of `metric`."""
    table = Table(title=f"personalization: each client's own held-out {metric} (mean ± sample std over seeds)")
    table.add_column("")
    for row in rows:
        table.add_column(row["method"], justify="right")
    for measure in MEASURES:
        table.add_row(MEASURE_TITLES[measure], *(cell(row, f"{metric}_{measure}") for row in rows))
    return table


def plot_clients_by_method(per_client: dict[str, list[list[float]]], path: Path, metric: str) -> None:
    """PNG: each client's own held-out accuracy under each method, the mean over seeds."""
    means = {method: [statistics.mean(values) for values in zip(*runs)] for method, runs in per_client.items()}
    num_clients = len(next(iter(means.values())))
    plot_grouped_bars(
        means, [str(index) for index in range(num_clients)], path, f"own held-out {metric}",
        "Each client's own held-out accuracy by method (mean over seeds)",
        width=max(6.0, 0.9 * num_clients + 3), legend={"ncols": min(len(means), 6), "fontsize": "small"},
    )


@dataclass(frozen=True)
class PersonalComparison:
    rows: list[dict]
    reference: str
    paired: list[dict]


def write_personal_comparison(folders: dict[str, list[RunFolder]], output_dir: Path) -> PersonalComparison:
    """personal.csv, personal_paired.csv, personal.md and clients_by_method.png from the run folders."""
    summaries = {method: [(f.read_config()["seed"], f.read_summary()) for f in group] for method, group in folders.items()}
    for method, group in summaries.items():
        if any("clients" not in summary for _, summary in group):
            raise ConfigError(f"{method}: a run has no per-client evaluation; set data.client_heldout_fraction above 0")
    figures = {
        method: {seed: {metric: run_figures(summary, metric) for metric in PERSONAL_METRICS} for seed, summary in group}
        for method, group in summaries.items()
    }
    rows = [method_row(method, list(runs.values())) for method, runs in figures.items()]
    reference = reference_method(list(figures))
    finals = {method: {seed: {m: run[m]["mean"] for m in PERSONAL_METRICS} for seed, run in runs.items()} for method, runs in figures.items()}
    paired = paired_rows(finals, list(PERSONAL_METRICS), reference)
    atomic_write_text(output_dir / "personal.csv", comparison_csv(rows))
    atomic_write_text(output_dir / "personal_paired.csv", paired_csv(paired))
    markdown = (
        "# Personalization\n\n" + rows_markdown(rows) + f"\n{CAPTION}\n\n![each client by method](clients_by_method.png)\n\n"
        + paired_markdown(paired, reference).replace("## Paired differences", "## Paired differences in the mean over clients")
    )
    atomic_write_text(output_dir / "personal.md", markdown)
    per_client = {
        method: [[served(row)["accuracy"] for row in summary["clients"]["per_client"]] for _, summary in group]
        for method, group in summaries.items()
    }
    plot_clients_by_method(per_client, output_dir / "clients_by_method.png", "accuracy")
    return PersonalComparison(rows, reference, paired)


def compare_personal(
    config: RunConfig, methods: list[str], num_seeds: int, output_dir: Path, show_progress: bool = True
) -> PersonalComparison:
    """Run or resume every (method, seed) pair, then write the comparison files into `output_dir`."""
    if config.data.client_heldout_fraction <= 0:
        raise ConfigError("data.client_heldout_fraction: 0 scores no client on its own data; set it above 0 to compare personalization")
    seeds = run_seeds(config, num_seeds)
    pairs = [pair_config(config, method, seed, output_dir) for method in methods for seed in seeds]
    run_configs(pairs, show_progress)
    folders: dict[str, list[RunFolder]] = {}
    for pair in pairs:
        folders.setdefault(pair.personal.method, []).append(RunFolder(pair.output_dir))
    return write_personal_comparison(folders, Path(output_dir))
