"""`spearfl compare` on a primed tiny model: 2 algorithms x 2 seeds x 1 round, resumption, table, plots, refusals."""

import csv
import json
import statistics

import pytest
import torch
from helpers import (
    end_to_end_assets,
    read_history,
    single_thread,
    strip_timing,
    write_run_config,
)
from typer.testing import CliRunner

import spearfl.runtime.server as server
import spearfl.tools.compare as compare_module
from spearfl.cli import app
from spearfl.config import ConfigError, config_to_dict, load_config
from spearfl.io import load_tensors
from spearfl.runtime.local import run_local
from spearfl.runtime.run_folder import RunFolder
from spearfl.tools.compare import compare, pair_config, parse_algorithms

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALGORITHMS = ["spear", "feedback_sft"]
SEEDS = [7, 8]  # the test config's seed is 7


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def shared_config(output_dir):
    assets = end_to_end_assets()
    return load_config(write_run_config(assets, assets.root / "compare.yaml", output_dir), ["server.rounds=1"])


@pytest.fixture(scope="module")
def comparison():
    """compare() once; returns (config, output folder, rows, metrics, file bytes right after)."""
    output = end_to_end_assets().root / "comparison"
    config = shared_config(end_to_end_assets().root / "compare-base")
    with single_thread():
        rows, metrics = compare(config, ALGORITHMS, len(SEEDS), output, show_progress=False)
    return config, output, rows, metrics


def folder(output, algorithm, seed) -> RunFolder:
    return RunFolder(output / algorithm / f"seed{seed}")


def test_every_pair_gets_a_complete_folder_differing_only_in_algorithm_and_seed(comparison):
    config, output, _, _ = comparison
    for algorithm in ALGORITHMS:
        for seed in SEEDS:
            run = folder(output, algorithm, seed)
            assert run.is_complete()
            saved = run.read_config()
            assert (saved["algorithm"], saved["seed"], saved["output_dir"]) == (algorithm, seed, str(run.path))
            shared = {key: value for key, value in saved.items() if key not in ("algorithm", "seed", "output_dir")}
            assert shared == {key: value for key, value in config_to_dict(config).items() if key in shared}
            assert shared.keys() == config_to_dict(config).keys() - {"algorithm", "seed", "output_dir"}
            assert [row["round"] for row in run.read_history()] == [0, 1]


def test_a_run_on_the_shared_model_equals_a_run_that_loads_its_own(comparison, tmp_path):
    """The last pair ran after three others on the same base model; a fresh load must give the same run."""
    _, output, _, _ = comparison
    shared = folder(output, ALGORITHMS[-1], SEEDS[-1])
    config = load_config(shared.config_path, [f"output_dir={tmp_path / 'alone'}"])
    run_local(config, show_progress=False)
    alone = RunFolder(tmp_path / "alone")
    assert strip_timing(alone.read_history()) == strip_timing(shared.read_history())
    for round_index in (0, 1):
        expected, got = load_tensors(alone.adapter_path(round_index)), load_tensors(shared.adapter_path(round_index))
        assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_rerun_reads_complete_folders_back_without_running(comparison, monkeypatch):
    config, output, rows, metrics = comparison
    histories = {path: path.read_text() for path in output.glob("*/seed*/history.jsonl")}
    assert len(histories) == len(ALGORITHMS) * len(SEEDS)
    monkeypatch.setattr(compare_module, "load_base_model", lambda *args, **kwargs: pytest.fail("loaded a model"))
    monkeypatch.setattr(server.FederatedRun, "run_rounds", lambda *args: pytest.fail("ran a round"))
    assert compare(config, ALGORITHMS, len(SEEDS), output, show_progress=False) == (rows, metrics)
    assert {path: path.read_text() for path in histories} == histories


def test_an_incomplete_pair_resumes_and_the_others_are_kept(tmp_path, monkeypatch):
    config = shared_config(tmp_path / "unused")
    output = tmp_path / "comparison"
    ran = []
    monkeypatch.setattr(server.FederatedRun, "run_rounds", lambda self, checkpoint, start: ran.append(self.config.seed) or {})
    monkeypatch.setattr(compare_module, "SharedBaseModel", FakeModels)
    monkeypatch.setattr(compare_module, "write_comparison", lambda folders, output_dir: folders)
    for seed, state in ((7, "complete"), (8, "interrupted")):
        run = RunFolder(output / "spear" / f"seed{seed}")
        run.path.mkdir(parents=True)
        run.write_config(config_to_dict(pair_config(config, "spear", seed, output)))
        run.write_status("running", last_round=0)
        run.write_status(state, last_round=0)
    folders = compare(config, ["spear"], 2, output, show_progress=False)
    assert ran == [8]
    assert [run.path for run in folders["spear"]] == [output / "spear" / "seed7", output / "spear" / "seed8"]


def invoke_compare(output, *extra: str):
    config_path = end_to_end_assets().root / "compare.yaml"  # written by the comparison fixture
    arguments = ["compare", config_path, "--algorithms", ",".join(ALGORITHMS), "--seeds", "2", "--set", "server.rounds=1"]
    result = CliRunner().invoke(app, [str(argument) for argument in [*arguments, "--output", output, *extra]])
    return result, " ".join((result.output + (result.stderr or "")).split())


def test_the_command_prints_the_table_of_a_finished_comparison(comparison, monkeypatch):
    _, output, _, _ = comparison
    monkeypatch.setattr(compare_module, "load_base_model", lambda *args, **kwargs: pytest.fail("loaded a model"))
    result, text = invoke_compare(output)
    assert result.exit_code == 0, text
    assert all(algorithm in text for algorithm in ALGORITHMS) and "best accuracy" in text
    assert str(output / "comparison.md") in text


def test_the_command_refuses_other_settings_in_the_same_folders_before_any_run(comparison, monkeypatch):
    _, output, _, _ = comparison
    monkeypatch.setattr(compare_module, "load_base_model", lambda *args, **kwargs: pytest.fail("loaded a model"))
    result, text = invoke_compare(output, "--set", "spear.margin=0.2")
    assert result.exit_code == 2
    assert "spear/seed7 holds a run with a different config (fields: spear.margin)" in text
    assert folder(output, "spear", 7).read_config()["spear"]["margin"] == 0.0


class FakeModels:
    def context_for(self, config):
        return object()


def test_the_csv_holds_mean_and_sample_spread_of_the_per_seed_runs(comparison):
    _, output, _, metrics = comparison
    assert metrics == ["accuracy", "loglik_accuracy"]
    with open(output / "comparison.csv", newline="") as file:
        rows = {row["algorithm"]: row for row in csv.DictReader(file)}
    assert list(rows) == ALGORITHMS
    for algorithm, row in rows.items():
        runs = [folder(output, algorithm, seed) for seed in SEEDS]
        summaries = [json.loads(run.summary_path.read_text()) for run in runs]
        histories = [read_history(run.path) for run in runs]
        assert row["num_seeds"] == "2"
        for metric in metrics:
            final = [summary["after"][metric] for summary in summaries]
            best = [max(r["eval"][metric] for r in history if r["round"] > 0) for history in histories]
            assert float(row[f"{metric}_mean"]) == pytest.approx(sum(final) / 2)
            assert float(row[f"{metric}_std"]) == pytest.approx(abs(final[0] - final[1]) / 2**0.5)
            assert float(row[f"best_{metric}_mean"]) == pytest.approx(sum(best) / 2)
            assert float(row[f"best_{metric}_std"]) == pytest.approx(abs(best[0] - best[1]) / 2**0.5)
        for key in ("generated_tokens", "trained_tokens", "client_seconds"):
            assert float(row[key]) == pytest.approx(sum(summary[key] for summary in summaries) / 2)
        assert float(row["peak_memory_mb"]) == max(summary["peak_memory_mb"] for summary in summaries)
        clients = [[client for r in history for client in r["clients"]] for history in histories]
        per_prompt = [sum(c["metrics"]["generations"] for c in run) / sum(c["metrics"]["prompts"] for c in run) for run in clients]
        assert float(row["generations_per_prompt"]) == pytest.approx(statistics.mean(per_prompt))
        per_client_round = [summary["upload_bytes"] / len(run) for summary, run in zip(summaries, clients)]
        assert len(clients[0]) == 2  # one round, two clients
        assert float(row["upload_bytes_per_client_round"]) == pytest.approx(statistics.mean(per_client_round))


def test_markdown_and_plots_are_written(comparison):
    _, output, _, _ = comparison
    markdown = (output / "comparison.md").read_text()
    assert all(f"| {algorithm} | 2 |" in markdown for algorithm in ALGORITHMS)
    assert "divided by all client rounds" in markdown
    for name in ("accuracy_by_round.png", "accuracy_by_compute.png"):
        assert (output / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"]({name})" in markdown


def test_algorithm_names_are_checked_up_front():
    assert parse_algorithms(" spear, grpo ,") == ["spear", "grpo"]
    with pytest.raises(ConfigError, match="'nope'"):
        parse_algorithms("spear,nope")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_algorithms("spear,spear")


def test_the_command_refuses_an_unknown_algorithm_before_any_work(tmp_path):
    config_path = write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "base")
    result = CliRunner().invoke(app, ["compare", str(config_path), "--algorithms", "spear,sparrow", "--output", str(tmp_path / "out")])
    output = " ".join((result.output + (result.stderr or "")).split())
    assert result.exit_code == 2
    assert "unknown 'sparrow'" in output
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_methods_with_different_budgets_before_any_work(tmp_path):
    config_path = write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "base")
    arguments = ["compare", str(config_path), "--algorithms", "spear,grpo,opsd", "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*arguments, "--set", "grpo.prompts_per_round=12", "--set", "opsd.local_steps=7"])
    output = " ".join((result.output + (result.stderr or "")).split())
    assert result.exit_code == 2
    assert "grpo.prompts_per_round=12 (grpo) vs 6 (spear)" in output and "opsd.local_steps=7 (opsd) vs 2 (spear)" in output
    assert not (tmp_path / "out").exists()
    same = CliRunner().invoke(app, [*arguments, "--set", "grpo.prompts_per_round=6", "--seeds", "1", "--set", "server.rounds=1"])
    assert "different client budgets" not in same.output  # a method may restate the shared budget
