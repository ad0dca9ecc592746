"""Paired differences between methods that share seeds: run seed s of every method has the same partitions,
prompts and first attempts, so the reference method (SPEAR when compared, else the first listed) minus each
other method, seed by seed, removes what the seeds share. For each accuracy metric the final held-out values
are paired over the seeds both finished, with the mean difference and a 95% paired t interval
(mean ± t(0.975, n - 1) · sd / √n); a verdict names a method ahead or behind only where the interval clears zero.

Left out: paired statistics on the best-over-rounds values (a maximum picked on the held-out set itself) and on
costs; any correction for the number of comparisons (baselines x metrics), and tests that do not assume roughly
normal per-seed differences.
"""

from __future__ import annotations

import csv
import io
import math
import statistics

import scipy.stats
from rich.table import Table

PAIRED_CAPTION = (
    "Held-out accuracy after the last round, reference minus baseline, seed by seed over the seeds both methods "
    "finished (run seed s of every method shares partitions, prompts and first attempts). The interval is a paired t "
    "interval over seeds: mean ± t(0.975, n - 1) · sd / √n, with sd the sample standard deviation of the n per-seed "
    "differences. A verdict names a method ahead or behind only where the whole interval lies above or below zero; "
    "one seed gives no interval. Nothing is corrected for the number of comparisons (baselines × metrics)."
)
PAIRED_FIELDS = [
    "reference", "baseline", "metric", "num_seeds", "mean_difference", "interval_low", "interval_high", "verdict",
    "seeds", "differences",
]
PAIRED_CONFIDENCE = 0.95

def reference_method(algorithms: list[str]) -> str:
    """The method every paired difference starts from: SPEAR when compared, else the first listed."""
    return "spear" if "spear" in algorithms else algorithms[0]


def paired_interval(differences: list[float]) -> tuple[float, float | None]:
    """Mean of per-seed differences and the half-width of its paired t interval; None for a single seed."""
    mean = statistics.mean(differences)
    if len(differences) == 1:
        return mean, None
    quantile = float(scipy.stats.t.ppf(0.5 + PAIRED_CONFIDENCE / 2, len(differences) - 1))
    return mean, quantile * statistics.stdev(differences) / math.sqrt(len(differences))


def paired_verdict(mean: float, half_width: float | None, reference: str) -> str:
    """A method is ahead or behind only where the whole interval lies on one side of zero."""
    name = "SPEAR" if reference == "spear" else reference
    if half_width is None:
        return "one seed: no interval"
    if mean - half_width > 0:
        return f"{name} ahead"
    if mean + half_width < 0:
        return f"{name} behind"
    return "no clear difference"


def paired_rows(finals: dict[str, dict[int, dict[str, float]]], metrics: list[str], reference: str) -> list[dict]:
    """Reference minus each other method, per metric, over the seeds both finished; metric-major order.

    finals: algorithm -> run seed -> metric -> held-out value after the last round.
    """
    rows = []
    for metric in metrics:
        for baseline, runs in finals.items():
            if baseline == reference:
                continue
            seeds = sorted(finals[reference].keys() & runs.keys())
            differences = [finals[reference][seed][metric] - runs[seed][metric] for seed in seeds]
            mean, half_width = paired_interval(differences)
            low, high = (None, None) if half_width is None else (mean - half_width, mean + half_width)
            rows.append({
                "reference": reference, "baseline": baseline, "metric": metric, "num_seeds": len(seeds),
                "mean_difference": mean, "interval_low": low, "interval_high": high,
                "verdict": paired_verdict(mean, half_width, reference), "seeds": seeds, "differences": differences,
            })
    return rows


def paired_csv(rows: list[dict]) -> str:
    """One line per (metric, baseline); seeds and their differences space-separated, in the same order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PAIRED_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        lists = {key: " ".join(str(value) for value in row[key]) for key in ("seeds", "differences")}
        writer.writerow({key: "" if value is None else value for key, value in row.items()} | lists)
    return buffer.getvalue()


def interval_text(row: dict) -> str:
    return "" if row["interval_low"] is None else f"[{row['interval_low']:+.3f}, {row['interval_high']:+.3f}]"


def paired_markdown(rows: list[dict], reference: str) -> str:
    """The paired section of comparison.md: a heading, one table line per (metric, baseline), the caption."""
    heading = f"## Paired differences: {reference} minus each baseline\n\n"
    if not rows:
        return heading + "One method compared: nothing to pair.\n"
    titles = ["metric", "baseline", "seeds", "mean difference", "95% interval", "verdict", "difference by seed"]
    lines = ["| " + " | ".join(titles) + " |", "|---|---|---:|---:|---:|---|---|"]
    for row in rows:
        by_seed = ", ".join(f"{seed}: {value:+.3f}" for seed, value in zip(row["seeds"], row["differences"]))
        cells = [row["metric"], row["baseline"], str(row["num_seeds"]), f"{row['mean_difference']:+.3f}",
                 interval_text(row), row["verdict"], by_seed]
        lines.append("| " + " | ".join(cells) + " |")
    return heading + "\n".join(lines) + f"\n\n{PAIRED_CAPTION}\n"


def paired_table(rows: list[dict], reference: str, defined_in: str = "comparison.md",
                 measure: str = "final held-out accuracy") -> Table:
    """The paired differences for the terminal, one section per metric; narrow enough for 100 columns."""
    table = Table(
        title=f"paired: {reference} minus each baseline, {measure}",
        caption=f"95% paired t interval over seeds; defined in {defined_in}",
    )
    for title in ("metric", "baseline", "seeds", "mean", "95% interval", "verdict"):
        table.add_column(title, justify="right" if title in ("seeds", "mean", "95% interval") else "left")
    for index, row in enumerate(rows):
        first_of_metric = index == 0 or rows[index - 1]["metric"] != row["metric"]
        if first_of_metric and index > 0:
            table.add_section()
        table.add_row(
            row["metric"] if first_of_metric else "", row["baseline"], str(row["num_seeds"]),
            f"{row['mean_difference']:+.3f}", interval_text(row), row["verdict"],
        )
    return table
