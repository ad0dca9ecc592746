"""Utility against privacy: one config run at several noise multipliers of central client-level DP (DP-FedAvg,
spearfl.federated.privacy), each in its own resumable folder DIR/noise-<z>, the base model loaded once.

Noise multiplier 0 is the run without DP (privacy.mode none), the reference. Every other run clips each update to
the config's `privacy.clip_norm` and noises the mean; its (epsilon, delta) is the accountant's after the run's
rounds. The figures (final held-out option log-likelihood and parsed accuracy, epsilon) go to
privacy-sweep.json, a markdown table and a plot of accuracy against epsilon (log scale), with the run without DP
and the base model as lines.
"""

from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path

from matplotlib.figure import Figure

from spearfl.config import RunConfig, config_to_dict, validate
from spearfl.federated.privacy import epsilon_after
from spearfl.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from spearfl.runtime.run_folder import RunFolder
from spearfl.tools.compare import run_configs

METRICS = {"loglik_accuracy": "option log-likelihood", "accuracy": "parsed accuracy"}


def sweep_config(config: RunConfig, noise: float, output_dir: Path) -> RunConfig:
    """The config with central DP at this noise multiplier (none at 0), in its own folder."""
    privacy = config_to_dict(config)["privacy"] | ({"mode": "none"} if noise == 0 else {"mode": "central", "noise_multiplier": noise})
    folder = Path(output_dir) / f"noise-{noise:g}"
    return validate({**config_to_dict(config), "privacy": privacy, "output_dir": str(folder)})


def sweep_figures(config: RunConfig) -> dict:
    """A finished sweep run's epsilon and held-out figures, first (base model) and final."""
    history = RunFolder(config.output_dir).read_history()
    evals = [row["eval"] for row in history if "eval" in row]
    rounds = max(row["round"] for row in history)
    private = config.privacy.mode != "none"
    epsilon = epsilon_after(rounds, config.privacy, config.data.num_clients, config.server.clients_per_round) if private else None
    return {
        "noise_multiplier": config.privacy.noise_multiplier if private else 0.0,
        "clip_norm": config.privacy.clip_norm if private else None,
        "epsilon": epsilon, "delta": config.privacy.delta if private else None, "rounds": rounds,
        **{metric: evals[-1].get(metric) for metric in METRICS},
        **{f"base_{metric}": evals[0].get(metric) for metric in METRICS},
        "folder": config.output_dir,
    }


def privacy_sweep(config: RunConfig, noises: list[float], output_dir: Path, show_progress: bool = True) -> list[dict]:
    """Run (or resume) every noise multiplier, then write the figures, table and plot into `output_dir`."""
    configs = [sweep_config(config, noise, output_dir) for noise in sorted(set(noises))]
    run_configs(configs, show_progress)
    rows = [sweep_figures(run) for run in configs]
    output_dir = Path(output_dir)
    setting = (
        f"{config.data.num_clients} clients, {config.server.clients_per_round} a round, {rows[0]['rounds']} rounds, "
        f"clip {config.privacy.clip_norm:g}, delta {config.privacy.delta:g}"
    )
    atomic_write_json(output_dir / "privacy-sweep.json", {"setting": setting, "figures": rows})
    atomic_write_text(output_dir / "privacy-sweep.md", sweep_markdown(rows))
    plot_sweep(rows, setting, output_dir / "privacy-sweep.png")
    return rows


def sweep_markdown(rows: list[dict]) -> str:
    lines = ["| noise multiplier | epsilon | " + " | ".join(METRICS.values()) + " |", "|---|---|" + "---|" * len(METRICS)]
    for row in rows:
        epsilon = "no DP" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        values = " | ".join("-" if row[m] is None else f"{row[m]:.3f}" for m in METRICS)
        lines.append(f"| {row['noise_multiplier']:g} | {epsilon} | {values} |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], setting: str, path: Path) -> None:
    """Accuracy against epsilon (log scale): one line per metric, the run without DP and the base model dashed."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    private = [row for row in rows if row["epsilon"] is not None and math.isfinite(row["epsilon"])]
    reference = next((row for row in rows if row["epsilon"] is None), None)
    for index, (metric, title) in enumerate(METRICS.items()):
        colour = f"C{index}"
        points = sorted((row["epsilon"], row[metric]) for row in private if row[metric] is not None)
        if points:
            axes.plot([e for e, _ in points], [v for _, v in points], marker="o", color=colour, label=f"{title}, central DP")
        if reference is not None and reference[metric] is not None:
            axes.axhline(reference[metric], color=colour, linestyle="--", label=f"{title}, no DP")
        base = rows[0][f"base_{metric}"]
        if base is not None:
            axes.axhline(base, color=colour, linestyle=":", label=f"{title}, base model")
    axes.set_xscale("log")
    axes.set_xlabel("epsilon after the run (log scale)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(f"Utility against client-level privacy\n{setting}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
