"""The run folder: resolved config, per-round history, summary, status, adapters and the resume checkpoint.

Layout:
    config.yaml                          resolved config, written once by the runtime
    status.json                          {"state", "last_round", "message", "updated_at"}
    history.jsonl                        one JSON object per finished round, in round order
    summary.json                         {"before": held-out metrics at round 0, "after": after the
                                         last round, "delta": after - before, ...other fields}
    accuracy.png                         plot_accuracy(history, folder.plot_path)
    clients.png                          plot_clients: each client's own held-out accuracy (data.client_heldout_fraction)
    adapters/round_0005.safetensors      global adapter after round 5
    personal/client_3.safetensors        client 3's personal adapter at the end (personal.method), as its checkpoint has it
    checkpoint/latest.json               {"round": 5, "folder": "round_0005.<unique>"}
    checkpoint/round_0005.<unique>/      adapter.safetensors, server_state.safetensors, state.json (personal.safetensors)

A folder holds a finished run only when status.json says "complete"; a resumed run reads the
checkpoint, calls `rewind_to(checkpoint round)` and goes on from the next round.

Every file is written atomically (temporary file beside it, then rename), so no reader sees
half a file. A checkpoint spans several files: it is written to a fresh folder and becomes
current only when latest.json is renamed over the old one, so a round that fails midway
leaves the previous checkpoint in force.

Left out: metrics other than accuracies in the plot (their scales differ); the runtime
decides what goes into history rows, and this module is generic over their keys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from spearfl.federated.aggregation import (
    ServerOptimizerState,
    state_from_tensors,
    state_to_tensors,
)
from spearfl.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
)

RUN_STATES = ("running", "complete", "interrupted", "failed")
# A run starts (or resumes) as running, and only a running run can complete. A late error
# handler must not turn "complete" into "failed"; a complete run may resume to extend it.
_ALLOWED_TRANSITIONS = {
    None: {"running", "interrupted", "failed"},
    "running": set(RUN_STATES),
    "interrupted": {"running", "interrupted", "failed"},
    "failed": {"running", "interrupted", "failed"},
    "complete": {"running"},
}
_ADAPTER_NAME = re.compile(r"round_(\d+)\.safetensors")


@dataclass(frozen=True)
class Checkpoint:
    """Everything a resumed run needs to redo round `round_index + 1` exactly."""

    round_index: int  # last round whose result the checkpoint holds
    global_state: dict[str, torch.Tensor]
    server_state: ServerOptimizerState
    info: dict[str, Any]  # runtime-defined JSON (e.g. random generator states)
    last_step: dict[str, torch.Tensor] | None = None  # the last global update (screening compares with it); None before any
    personal: dict[int, dict[str, torch.Tensor]] | None = None  # each client's personal adapter (spearfl.personal)


class RunFolder:
    """Reads and writes the files of one run folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.status_path = self.path / "status.json"
        self.history_path = self.path / "history.jsonl"
        self.summary_path = self.path / "summary.json"
        self.plot_path = self.path / "accuracy.png"
        self.adapters_dir = self.path / "adapters"
        self.checkpoint_dir = self.path / "checkpoint"

    # config -----------------------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text(encoding="utf-8"))

    # status -----------------------------------------------------------------

    def write_status(self, state: str, last_round: int, message: str = "") -> None:
        """Record the run's state; raises ValueError on a transition the lifecycle forbids."""
        if state not in RUN_STATES:
            raise ValueError(f"state must be one of {RUN_STATES}, got {state!r}")
        current = self.read_status()
        current_state = None if current is None else current["state"]
        if state not in _ALLOWED_TRANSITIONS[current_state]:
            raise ValueError(f"status cannot go from {current_state!r} to {state!r}")
        updated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        status = {"state": state, "last_round": last_round, "message": message, "updated_at": updated_at}
        atomic_write_json(self.status_path, status)

    def read_status(self) -> dict[str, Any] | None:
        return read_json(self.status_path) if self.status_path.exists() else None

    def is_complete(self) -> bool:
        status = self.read_status()
        return status is not None and status["state"] == "complete"

    # history ----------------------------------------------------------------

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history_path.exists():
            return []
        lines = self.history_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def append_history(self, row: dict[str, Any]) -> None:
        """Add one round's row; the whole file is rewritten atomically, so a crash never leaves half a line."""
        rows = self.read_history()
        if rows and row["round"] <= rows[-1]["round"]:
            # a resumed run that forgot rewind_to would otherwise log a round twice
            raise ValueError(f"round {row['round']} does not follow the last logged round {rows[-1]['round']}")
        self._write_history(rows + [row])

    def _write_history(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.history_path, "".join(json.dumps(row) + "\n" for row in rows))

    def rewind_to(self, round_index: int) -> None:
        """Forget rounds after `round_index` (history rows, adapter files): a resumed run redoes them."""
        rows = self.read_history()
        self._write_history([row for row in rows if row["round"] <= round_index])
        for path in self.adapters_dir.glob("round_*.safetensors"):
            match = _ADAPTER_NAME.fullmatch(path.name)
            if match and int(match.group(1)) > round_index:
                path.unlink()

    # summary ----------------------------------------------------------------

    def write_summary(
        self, before: dict[str, Any], after: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> None:
        """summary.json: held-out metrics before round 1 and after the last round, their delta, and `extra`."""
        summary = {"before": before, "after": after, "delta": metric_deltas(before, after)}
        clashing = summary.keys() & (extra or {}).keys()
        if clashing:
            raise ValueError(f"extra fields may not replace {sorted(clashing)}")
        atomic_write_json(self.summary_path, summary | (extra or {}))

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_path) if self.summary_path.exists() else None

    # adapters ---------------------------------------------------------------

    def adapter_path(self, round_index: int) -> Path:
        return self.adapters_dir / f"round_{round_index:04d}.safetensors"

    def save_adapter(self, round_index: int, state: dict[str, torch.Tensor]) -> None:
        save_tensors(self.adapter_path(round_index), state)

    def save_personal(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        for client, state in states.items():
            save_tensors(self.path / "personal" / f"client_{client}.safetensors", state)

    def client_update_path(self, round_index: int, client: int) -> Path:
        return self.path / "clients" / f"round_{round_index:04d}" / f"client_{client}.safetensors"

    def save_client_updates(self, round_index: int, states: dict[int, dict[str, torch.Tensor]], global_state) -> None:
        """The adapters the server received in a round, one file per client, beside the global adapter it sent
        (global.safetensors); each file written atomically."""
        save_tensors(self.path / "clients" / f"round_{round_index:04d}" / "global.safetensors", global_state)
        for client, state in states.items():
            path = self.client_update_path(round_index, client)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, state)

    # checkpoint -------------------------------------------------------------

    def save_checkpoint(
        self,
        round_index: int,
        global_state: dict[str, torch.Tensor],
        server_state: ServerOptimizerState,
        info: dict[str, Any],
        last_step: dict[str, torch.Tensor] | None = None,
        personal: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Write a new checkpoint folder, then point latest.json at it, then drop older folders. `personal`: each
        simulated client's personal adapter, one file (`personal.safetensors`, keys "<client>/<tensor>")."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # a fresh name each time: never overwrite the folder latest.json may still point at
        folder = Path(tempfile.mkdtemp(dir=self.checkpoint_dir, prefix=f"round_{round_index:04d}."))
        save_tensors(folder / "adapter.safetensors", global_state)
        server_tensors, server_metadata = state_to_tensors(server_state)
        save_tensors(folder / "server_state.safetensors", server_tensors)
        if last_step is not None:
            save_tensors(folder / "last_step.safetensors", last_step)
        if personal:
            # copies: clients may hold the very same tensors (each left with the global adapter), which safetensors refuses
            save_tensors(folder / "personal.safetensors",
                         {f"{client}/{name}": tensor.clone() for client, state in personal.items() for name, tensor in state.items()})
        atomic_write_json(folder / "state.json", {"round": round_index, "server_state": server_metadata, "info": info})
        atomic_write_json(self.checkpoint_dir / "latest.json", {"round": round_index, "folder": folder.name})
        self._remove_checkpoints_except(folder.name)

    def _remove_checkpoints_except(self, current: str) -> None:
        """Remove superseded checkpoints and leftovers of failed saves."""
        for path in self.checkpoint_dir.glob("round_*"):
            if path.is_dir() and path.name != current:
                shutil.rmtree(path)

    def load_checkpoint(self) -> Checkpoint | None:
        """The last complete checkpoint, or None when the run never finished a round."""
        latest_path = self.checkpoint_dir / "latest.json"
        if not latest_path.exists():
            return None
        folder = self.checkpoint_dir / read_json(latest_path)["folder"]
        state = read_json(folder / "state.json")
        server_state = state_from_tensors(load_tensors(folder / "server_state.safetensors"), state["server_state"])
        global_state = load_tensors(folder / "adapter.safetensors")
        step_path = folder / "last_step.safetensors"
        last_step = load_tensors(step_path) if step_path.exists() else None
        personal: dict[int, dict[str, torch.Tensor]] = {}
        if (folder / "personal.safetensors").exists():
            for key, tensor in load_tensors(folder / "personal.safetensors").items():
                client, name = key.split("/", 1)
                personal.setdefault(int(client), {})[name] = tensor
        return Checkpoint(state["round"], global_state, server_state, state["info"], last_step, personal)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """after - before for every numeric metric present in both."""
    return {
        name: after[name] - before[name]
        for name in before
        if name in after and _is_number(before[name]) and _is_number(after[name])
    }


def accuracy_series(history_rows: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Label -> (rounds, values): every held-out metric named *accuracy*, and online first-try accuracy."""
    series: dict[str, tuple[list[int], list[float]]] = {}

    def add(label: str, round_index: int, value: Any) -> None:
        if _is_number(value):
            rounds, values = series.setdefault(label, ([], []))
            rounds.append(round_index)
            values.append(value)

    for row in history_rows:
        for name, value in (row.get("eval") or {}).items():
            if "accuracy" in name:
                add(f"eval/{name}", row["round"], value)
        add("online/first_try_accuracy", row["round"], (row.get("online") or {}).get("first_try_accuracy"))
    return series


def plot_accuracy(history_rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """PNG of held-out and online first-try accuracy (fractions in [0, 1]) per round."""
    # Figure without pyplot: no global backend switch and no GUI, so it works headless and in threads.
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    series = accuracy_series(history_rows)
    for label, (rounds, values) in series.items():
        axes.plot(rounds, values, marker="o", markersize=3, label=label)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title("Held-out and online first-try accuracy per round")
    axes.grid(alpha=0.3)
    if series:
        axes.legend()
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def client_adapters(client_rows: list[dict[str, Any]]) -> list[str]:
    """The adapters the clients were scored with ("global", and any other), in the order they first appear."""
    names: list[str] = []
    for row in client_rows:
        names += [name for name in row if name != "client" and name not in names]
    return names


def client_summary(client_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-client held-out figures of one evaluation, summed up: for each adapter and each accuracy metric, the
    mean over the clients and the worst client (with its id), beside the rows themselves."""
    summary: dict[str, Any] = {"per_client": client_rows}
    for adapter in client_adapters(client_rows):
        scored = [(row["client"], row[adapter]) for row in client_rows if adapter in row]
        names = sorted({name for _, metrics in scored for name, value in metrics.items() if "accuracy" in name and _is_number(value)})
        for name in names:
            values = [(metrics[name], client) for client, metrics in scored if _is_number(metrics.get(name))]
            worst_value, worst_client = min(values)
            summary.setdefault(adapter, {})[name] = {
                "mean": sum(value for value, _ in values) / len(values), "worst": worst_value, "worst_client": worst_client,
            }
    return summary


def client_table(summary: dict[str, Any], metric: str = "loglik_accuracy") -> Table:
    """Rich table of each client's own held-out `metric` per adapter, then the mean and the worst client."""
    rows = summary["per_client"]
    adapters = client_adapters(rows)
    table = Table(title=f"Each client's own held-out {metric}")
    table.add_column("client")
    for adapter in adapters:
        table.add_column(adapter, justify="right")
    for row in rows:
        table.add_row(str(row["client"]), *(_format_metric((row.get(adapter) or {}).get(metric)) for adapter in adapters))
    for label in ("mean", "worst"):
        table.add_row(label, *(_format_metric(summary.get(adapter, {}).get(metric, {}).get(label)) for adapter in adapters))
    return table


def plot_clients(client_rows: list[dict[str, Any]], path: str | os.PathLike, metric: str = "loglik_accuracy") -> None:
    """PNG of each client's own held-out accuracy, one bar per adapter the clients were scored with."""
    bars = {adapter: [(row.get(adapter) or {}).get(metric) or 0.0 for row in client_rows] for adapter in client_adapters(client_rows)}
    plot_grouped_bars(bars, [str(row["client"]) for row in client_rows], path, metric, "Each client's own held-out accuracy",
                      width=max(5.0, 0.6 * len(client_rows) + 2))


def plot_grouped_bars(bars: dict[str, list[float]], clients: list[str], path: str | os.PathLike, ylabel: str, title: str,
                      width: float, legend: dict | None = None) -> None:
    """PNG of one group of bars per client, a bar per entry of `bars` (label -> one value per client), from 0 to 1."""
    figure = Figure(figsize=(width, 4.0), layout="constrained")
    axes = figure.subplots()
    bar_width = 0.8 / max(len(bars), 1)
    for offset, (label, values) in enumerate(bars.items()):
        positions = [index + (offset - (len(bars) - 1) / 2) * bar_width for index in range(len(clients))]
        axes.bar(positions, values, width=bar_width, label=label)
    axes.set_xticks(range(len(clients)), clients)
    axes.set_xlabel("client")
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="y")
    if bars:
        axes.legend(**(legend or {}))
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _format_metric(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not signed:
        return str(value)
    if _is_number(value):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return str(value)


def summary_table(summary: dict[str, Any]) -> Table:
    """Rich table of held-out metrics: before, after and delta per metric; a share per label gets a row each.

    Four short columns, so the table reads in an 80-column terminal.
    """
    before, after = flat_metrics(summary.get("before") or {}), flat_metrics(summary.get("after") or {})
    deltas = metric_deltas(before, after)
    table = Table(title="Held-out metrics")
    table.add_column("metric")
    for column in ("before", "after", "delta"):
        table.add_column(column, justify="right")
    for name in list(before) + [name for name in after if name not in before]:
        table.add_row(
            name,
            _format_metric(before.get(name)),
            _format_metric(after.get(name)),
            _format_metric(deltas.get(name), signed=True),
        )
    return table


def flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics with each nested share (answer_share: {label: share}) as its own "answer_share label" entry."""
    flat: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat |= {f"{name} {label}": share for label, share in value.items()}
        else:
            flat[name] = value
    return flat


SUMMARY_METRICS = ("accuracy", "parse_rate", "loglik_accuracy", "loglik_norm_accuracy", "cloze_accuracy", "cloze_norm_accuracy")


def summarize_runs(summaries: list[tuple[str, dict[str, Any]]]) -> Table:
    """Per headline held-out metric: before, after and delta as mean ± sample spread over runs, and each run's delta."""
    metrics = [name for name in SUMMARY_METRICS if all(name in summary["before"] for _, summary in summaries)]
    table = Table(title=f"held-out metrics over {len(summaries)} runs: mean ± sample standard deviation")
    for column in ("metric", "before", "after", "delta", "delta per run"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in metrics:
        before = [summary["before"][name] for _, summary in summaries]
        after = [summary["after"][name] for _, summary in summaries]
        delta = [a - b for a, b in zip(after, before)]
        per_run = " ".join(f"{value:+.3f}" for value in delta)
        table.add_row(name, _mean_and_spread(before), _mean_and_spread(after), _mean_and_spread(delta), per_run)
    return table


def _mean_and_spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    spread = (sum((value - mean) ** 2 for value in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {spread:.3f}"
