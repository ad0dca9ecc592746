"""`spearfl bench-scaling`: a client round's time and peak memory as its setting grows, to size a device.

Every point is the bench's SPEAR client round (`spearfl.tools.bench.measure_round`, round 1 of client 0) on the
config with one setting changed, each in a Python process of its own, so that a point's peak resident memory is
its own and not what an earlier point left in the allocator. The axes, each through the config's own setting:
- prompts per round (`client.prompts_per_round`): 16, 32, 64, 128;
- rows per optimizer step (`spear.batch_size` wins + as many losses): 8, 16, 32;
- LoRA layers (`lora.layers`): the top 8 against all;
- the model (`model.name`): the config's, and each larger packaged model whose package is installed.
A point on the config's own value is the config itself, measured once for every axis.

Resumable: each point is saved under OUTPUT/points/ as it finishes, and a later call measures only what is
missing (the saved config must be the same). Writes OUTPUT/scaling.json, the table as OUTPUT/scaling.md and the
plot as OUTPUT/scaling.png.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from rich.table import Table

from spearfl.errors import UserError
from spearfl.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

PROMPTS = (16, 32, 64, 128)
SPEAR_BATCH_SIZES = (4, 8, 16)  # wins a step; as many losses: 8, 16, 32 rows
TOP_LAYERS = 8
LARGER_MODELS = ("gemma-3-270m",)
AXES = ("prompts", "rows_per_step", "lora_layers", "model")
COLUMNS = (  # (key in a point, heading, format)
    ("round_seconds", "round s", "{:.1f}"),
    ("generation_seconds", "generation s", "{:.1f}"),
    ("training_seconds", "training s", "{:.1f}"),
    ("generation_peak_memory_mb", "generation peak MB", "{:,.0f}"),
    ("training_peak_memory_mb", "training peak MB", "{:,.0f}"),
    ("peak_memory_mb", "round peak MB", "{:,.0f}"),
    ("reference_mb", "weights + adapter + optimizer MB", "{:,.0f}"),
    ("trained_tokens", "trained tokens", "{:,.0f}"),
    ("training_ms_per_token", "training ms / trained token", "{:.2f}"),
    ("micro_batch_rows", "micro-batch rows", "{:.0f}"),
    ("checkpointed_steps", "checkpointed steps", "{:.0f}"),
)


@dataclass(frozen=True)
class Point:
    axis: str
    value: str  # as the table and plot show it
    overrides: tuple[str, ...]  # `--set` overrides of the config; () is the config itself

    @property
    def key(self) -> str:
        """The file a point is saved under: one per distinct setting, shared by the axes that meet there."""
        if not self.overrides:
            return "config"
        return hashlib.sha256("\n".join(sorted(self.overrides)).encode()).hexdigest()[:12]


def scaling_points(config, axes: tuple[str, ...] = AXES) -> tuple[list[Point], list[str]]:
    """The points of the chosen axes for this config, and why any model is left out."""
    from spearfl.lm.models import PACKAGED_MODELS, resolve_model_path

    points, skipped = [], []

    def add(axis: str, value: str, setting: str | None, same: bool) -> None:
        points.append(Point(axis, value, () if same else (setting,)))

    if "prompts" in axes:
        for prompts in sorted({*PROMPTS, config.client.prompts_per_round}):
            add("prompts", str(prompts), f"client.prompts_per_round={prompts}", prompts == config.client.prompts_per_round)
    if "rows_per_step" in axes:
        for batch in sorted({*SPEAR_BATCH_SIZES, config.spear.batch_size}):
            add("rows_per_step", str(2 * batch), f"spear.batch_size={batch}", batch == config.spear.batch_size)
    if "lora_layers" in axes:
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(resolve_model_path(config.model.name)).num_hidden_layers
        top = list(range(layers - TOP_LAYERS, layers))
        if layers > TOP_LAYERS:
            add("lora_layers", f"top {TOP_LAYERS}", f"lora.layers={top}", config.lora.layers == top)
        add("lora_layers", f"all {layers}", "lora.layers=null", config.lora.layers is None)
    if "model" in axes:
        add("model", config.model.name, None, True)
        for name in LARGER_MODELS:
            package = PACKAGED_MODELS[name][0]
            if name == config.model.name:
                continue
            if importlib.util.find_spec(package) is None:
                skipped.append(f"{name}: its package {package} is not installed (scripts/setup.sh installs it)")
                continue
            add("model", name, f"model.name={name}", False)
    return points, skipped


def measure_point(config_path: Path, overrides: tuple[str, ...]) -> dict:
    """One SPEAR client round of the config with `overrides`, in this process (run by `run_point` in a fresh one)."""
    from spearfl.algorithms.base import ClientRound
    from spearfl.config import load_config
    from spearfl.lm.memory import resident_mb
    from spearfl.lm.models import get_adapter_state
    from spearfl.runtime.setup import build_context, check_config, prepare_data
    from spearfl.tools.bench import measure_round, memory_reference

    before_model = resident_mb()
    config = load_config(config_path, list(overrides))
    check_config(config)
    context = build_context(config)
    examples = prepare_data(config).clients[0]
    reference = memory_reference(context)
    work = ClientRound(0, 1, examples, get_adapter_state(context.model), config.optimizer.lr, config.seed)
    row = measure_round(context, "spear", work)
    return {
        **row,
        "round_seconds": row["seconds"],
        "process_before_model_mb": before_model,
        "reference_mb": reference["total_mb"],
        "parameters": sum(parameter.numel() for parameter in context.model.parameters()),
        "lora_parameters": sum(p.numel() for p in context.model.parameters() if p.requires_grad),
        "prompts": config.client.prompts_per_round,
        "rows_per_step": 2 * config.spear.batch_size,
        "model": config.model.name,
    }


def run_point(config_path: Path, point: Point) -> dict:
    """`measure_point` in a fresh Python process: its JSON is the last line the process prints."""
    command = [sys.executable, "-m", "spearfl.tools.scaling", str(config_path), *point.overrides]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        tail = "\n".join(finished.stderr.strip().splitlines()[-15:])
        raise UserError(f"the scaling point {point.axis}={point.value} failed (exit {finished.returncode}):\n{tail}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run_scaling(config_path: Path, output_dir: Path, axes: tuple[str, ...] = AXES, progress=None, measure=run_point) -> dict:
    """Measure every missing point of the chosen axes, then write scaling.json, scaling.md and scaling.png."""
    from spearfl.config import load_config
    from spearfl.tools.bench import machine

    config = load_config(config_path)
    config_text = Path(config_path).read_text(encoding="utf-8")
    saved_config = output_dir / "config.yaml"
    if saved_config.exists() and saved_config.read_text(encoding="utf-8") != config_text:
        raise UserError(f"{output_dir} holds points of another config ({saved_config}); choose another --output or delete it")
    points, skipped = scaling_points(config, axes)
    atomic_write_text(saved_config, config_text)
    measured: dict[str, dict] = {}
    for point in points:
        path = output_dir / "points" / f"{point.key}.json"
        if point.key not in measured:
            if path.exists():
                measured[point.key] = read_json(path)
            else:
                if progress is not None:
                    progress(f"{point.axis} = {point.value}")
                started = time.perf_counter()
                result = measure(Path(config_path), point)
                result |= {"overrides": list(point.overrides), "process_seconds": time.perf_counter() - started}
                atomic_write_json(path, result)
                measured[point.key] = result
    report = {
        "config": str(config_path),
        "machine": machine(),
        "skipped": skipped,
        "points": [{"axis": point.axis, "value": point.value, **measured[point.key]} for point in points],
    }
    atomic_write_json(output_dir / "scaling.json", report)
    atomic_write_text(output_dir / "scaling.md", markdown_table(report))
    atomic_write_bytes(output_dir / "scaling.png", plot_png(report))
    return report


def _with_rates(point: dict) -> dict:
    """A point with its training time per trained token: rounds that train on fewer rows compare by it."""
    if point.get("trained_tokens"):
        return point | {"training_ms_per_token": 1000 * point["training_seconds"] / point["trained_tokens"]}
    return point


def _cells(point: dict) -> list[str]:
    point = _with_rates(point)
    return [form.format(point[key]) if key in point else "-" for key, _, form in COLUMNS]


def markdown_table(report: dict) -> str:
    lines = [f"One SPEAR client round of {report['config']} with one setting changed, each point in a process of its own.",
             f"Machine: {report['machine']['cpu']}, {report['machine']['torch_threads']} torch threads.", ""]
    lines.append("| axis | value | " + " | ".join(heading for _, heading, _ in COLUMNS) + " |")
    lines.append("|---|---|" + "---:|" * len(COLUMNS))
    for point in report["points"]:
        lines.append(f"| {point['axis'].replace('_', ' ')} | {point['value']} | " + " | ".join(_cells(point)) + " |")
    lines += [f"\nLeft out: {reason}" for reason in report["skipped"]]
    return "\n".join(lines) + "\n"


def rich_table(report: dict) -> Table:
    table = Table(title=f"scaling: one SPEAR client round of {report['config']}")
    for heading in ("axis", "value", *(heading for _, heading, _ in COLUMNS)):
        table.add_column(heading, justify="left" if heading in ("axis", "value") else "right")
    for point in report["points"]:
        table.add_row(point["axis"].replace("_", " "), point["value"], *_cells(point))
    return table


def plot_png(report: dict) -> bytes:
    """One panel per axis: round seconds (bars, left) and peak resident memory by phase (lines, right)."""
    from io import BytesIO

    axes_present = list(dict.fromkeys(point["axis"] for point in report["points"]))
    figure = Figure(figsize=(4.2 * len(axes_present), 3.6), layout="constrained")
    panels = figure.subplots(1, len(axes_present), squeeze=False)[0]
    for panel, axis in zip(panels, axes_present):
        points = [point for point in report["points"] if point["axis"] == axis]
        labels = [point["value"] for point in points]
        positions = range(len(points))
        panel.bar(positions, [point["round_seconds"] for point in points], color="#9ecae1", label="round seconds")
        panel.set_xticks(list(positions), labels, rotation=15 if axis == "model" else 0)
        panel.set_xlabel(axis.replace("_", " "))
        panel.set_ylabel("round seconds")
        memory = panel.twinx()
        for key, style in (("generation_peak_memory_mb", "o-"), ("training_peak_memory_mb", "s--")):
            memory.plot(positions, [point[key] for point in points], style, label=key.split("_")[0] + " peak MB")
        memory.set_ylim(bottom=0)
        memory.set_ylabel("peak resident MB")
        if panel is panels[0]:
            memory.legend(loc="lower right", fontsize="small")
    figure.suptitle("one SPEAR client round: time (bars) and peak memory (lines)")
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def main() -> None:
    """`python -m spearfl.tools.scaling CONFIG [OVERRIDE...]`: one point, printed as JSON on the last line."""
    from spearfl.lm.models import quiet_library_output

    quiet_library_output()
    print(json.dumps(measure_point(Path(sys.argv[1]), tuple(sys.argv[2:]))))


if __name__ == "__main__":
    main()
