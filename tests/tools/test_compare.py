"""`spearfl compare` on a primed tiny model: 2 algorithms x 2 seeds x 1 round, resumption, table, plots, refusals;
paired differences by seed on hand-made run folders."""

import csv
import json
import math
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
from rich.console import Console
from typer.testing import CliRunner

import spearfl.tools.compare as compare_module
from spearfl.cli import app
from spearfl.config import ConfigError, config_to_dict, load_config
from spearfl.io import load_tensors
from spearfl.runtime import server
from spearfl.runtime.local import run_local
from spearfl.runtime.run_folder import RunFolder
from spearfl.tools.compare import (
    ACCURACY_METRICS,
    compare,
    pair_config,
    parse_algorithms,
    shared_metrics,
    write_comparison,
)
from spearfl.tools.paired import paired_interval, paired_table

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


EVALUATIONS = []  # (seed, whether every LoRA B was zero) of each held-out evaluation the comparison fixture ran


@pytest.fixture(scope="module")
def comparison():
    """compare() once; returns (config, output folder, the Comparison)."""
    output = end_to_end_assets().root / "comparison"
    config = shared_config(end_to_end_assets().root / "compare-base")

    def counted(self, heldout, global_state):
        EVALUATIONS.append((self.config.seed, server.adapter_is_identity(global_state)))
        return evaluate(self, heldout, global_state)

    evaluate = server.FederatedRun.evaluate
    with single_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(server, "evaluate", counting(server.evaluate))
        patch.setattr(server.FederatedRun, "evaluate", counted)
        result = compare(config, ALGORITHMS, len(SEEDS), output, show_progress=False)
    return config, output, result


MODEL_EVALUATIONS = []


def counting(function):
    def wrapper(*args, **kwargs):
        MODEL_EVALUATIONS.append(1)
        return function(*args, **kwargs)

    return wrapper


def folder(output, algorithm, seed) -> RunFolder:
    return RunFolder(output / algorithm / f"seed{seed}")


def test_every_pair_gets_a_complete_folder_differing_only_in_algorithm_and_seed(comparison):
    config, output, _ = comparison
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


def test_the_base_model_is_evaluated_once_for_all_pairs(comparison):
    """Round 0 (every LoRA B zero) of the four pairs shares one held-out set; the model ran it once, and each
    pair's round 1 (a trained adapter) ran its own."""
    assert sorted(EVALUATIONS) == sorted((seed, identity) for seed in SEEDS for _ in ALGORITHMS for identity in (True, False))
    assert len(MODEL_EVALUATIONS) == 1 + len(ALGORITHMS) * len(SEEDS)
    zeros = [folder(comparison[1], algorithm, seed).read_history()[0]["eval"] for algorithm in ALGORITHMS for seed in SEEDS]
    assert all(row == zeros[0] for row in zeros)


def test_only_an_adapter_with_every_b_zero_counts_as_the_base_model():
    state = {"layer.lora_A.weight": torch.ones(2, 3), "layer.lora_B.weight": torch.zeros(3, 2)}
    assert server.adapter_is_identity(state)
    state["layer.lora_B.weight"][1, 0] = 1e-12
    assert not server.adapter_is_identity(state)
    assert not server.adapter_is_identity({"layer.lora_A.weight": torch.zeros(2, 3)})


def test_a_run_on_the_shared_model_equals_a_run_that_loads_its_own(comparison, tmp_path):
    """The last pair ran after three others on the same base model; a fresh load must give the same run."""
    _, output, _ = comparison
    shared = folder(output, ALGORITHMS[-1], SEEDS[-1])
    config = load_config(shared.config_path, [f"output_dir={tmp_path / 'alone'}"])
    run_local(config, show_progress=False)
    alone = RunFolder(tmp_path / "alone")
    assert strip_timing(alone.read_history()) == strip_timing(shared.read_history())
    for round_index in (0, 1):
        expected, got = load_tensors(alone.adapter_path(round_index)), load_tensors(shared.adapter_path(round_index))
        assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_rerun_reads_complete_folders_back_without_running(comparison, monkeypatch):
    config, output, result = comparison
    histories = {path: path.read_text() for path in output.glob("*/seed*/history.jsonl")}
    assert len(histories) == len(ALGORITHMS) * len(SEEDS)
    monkeypatch.setattr(compare_module, "load_base_model", lambda *args, **kwargs: pytest.fail("loaded a model"))
    monkeypatch.setattr(server.FederatedRun, "run_rounds", lambda *args: pytest.fail("ran a round"))
    assert compare(config, ALGORITHMS, len(SEEDS), output, show_progress=False) == result
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
    _, output, _ = comparison
    monkeypatch.setattr(compare_module, "load_base_model", lambda *args, **kwargs: pytest.fail("loaded a model"))
    result, text = invoke_compare(output)
    assert result.exit_code == 0, text
    assert all(algorithm in text for algorithm in ALGORITHMS) and "best accuracy" in text
    assert "paired: spear minus each baseline" in text and "95% paired t interval" in text
    assert str(output / "comparison.md") in text and str(output / "paired.csv") in text


def test_the_command_refuses_other_settings_in_the_same_folders_before_any_run(comparison, monkeypatch):
    _, output, _ = comparison
    monkeypatch.setattr(compare_module, "load_base_model", lambda *args, **kwargs: pytest.fail("loaded a model"))
    result, text = invoke_compare(output, "--set", "spear.margin=0.2")
    assert result.exit_code == 2
    assert "spear/seed7 holds a run with a different config (fields: spear.margin)" in text
    assert folder(output, "spear", 7).read_config()["spear"]["margin"] == 0.0


class FakeModels:
    def context_for(self, config):
        return object()


def test_the_csv_holds_mean_and_sample_spread_of_the_per_seed_runs(comparison):
    _, output, result = comparison
    metrics = result.metrics
    assert metrics[0] == "loglik_accuracy" and "accuracy" in metrics  # the format-free metric first
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
    _, output, _ = comparison
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


# ---------------------------------------------------------------------------------------------- paired differences

T_975_2 = 4.302653  # t quantile 0.975 at 2 degrees of freedom, from a printed table


def fake_run(output, algorithm, seed, after) -> RunFolder:
    """A finished run folder with what write_comparison reads: its seed, final metrics, one evaluated round."""
    run = RunFolder(output / algorithm / f"seed{seed}")
    run.path.mkdir(parents=True)
    run.write_config({"algorithm": algorithm, "seed": seed})
    costs = {"generated_tokens": 10, "trained_tokens": 20, "client_seconds": 1.0, "peak_memory_mb": 5.0, "upload_bytes": 8}
    run.write_summary({metric: 0.0 for metric in after}, after, costs)
    client = {"metrics": {"generations": 2, "prompts": 2}}
    run.append_history({"round": 0, "eval": {metric: 0.0 for metric in after}, "clients": []})
    run.append_history({"round": 1, "eval": after, "clients": [client], "online": {}})
    return run


def fake_comparison(output, finals: dict[str, dict[int, float]]):
    """write_comparison over hand-made folders; finals: algorithm -> seed -> accuracy (loglik_accuracy = half)."""
    folders = {
        algorithm: [fake_run(output, algorithm, seed, {"accuracy": value, "loglik_accuracy": value / 2})
                    for seed, value in by_seed.items()]
        for algorithm, by_seed in finals.items()
    }
    return write_comparison(folders, output)


def test_the_paired_interval_is_the_hand_computed_t_interval():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.302653 * 0.057735
    mean, half_width = paired_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert half_width == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-6)
    assert half_width == pytest.approx(0.248413, abs=1e-6)
    # differences 0.10, 0.11, 0.12: sd 0.01, half-width 0.0248413, so the interval [0.0852, 0.1348] clears zero
    mean, half_width = paired_interval([0.10, 0.11, 0.12])
    assert (mean, half_width) == (pytest.approx(0.11), pytest.approx(T_975_2 * 0.01 / math.sqrt(3), rel=1e-6))
    # two seeds: t(0.975, 1) = 12.706205; differences 0.1, 0.3 have sd 0.1 * sqrt(2)
    assert paired_interval([0.1, 0.3])[1] == pytest.approx(12.706205 * 0.1 * math.sqrt(2) / math.sqrt(2), rel=1e-6)
    assert paired_interval([0.25]) == (0.25, None)


def test_verdicts_need_the_whole_interval_on_one_side_of_zero(tmp_path):
    spear = {7: 0.5, 8: 0.6, 9: 0.7}
    baselines = {
        "feedback_sft": {7: 0.4, 8: 0.4, 9: 0.4},  # differences 0.1, 0.2, 0.3: interval [-0.048, +0.448]
        "grpo": {7: 0.40, 8: 0.49, 9: 0.58},  # differences 0.10, 0.11, 0.12: interval [+0.085, +0.135]
        "opsd": {7: 0.60, 8: 0.71, 9: 0.82},  # differences -0.10, -0.11, -0.12
    }
    result = fake_comparison(tmp_path, {"spear": spear, **baselines})
    by_baseline = {row["baseline"]: row for row in result.paired if row["metric"] == "accuracy"}
    assert result.reference == "spear"
    assert {name: row["verdict"] for name, row in by_baseline.items()} == {
        "feedback_sft": "no clear difference", "grpo": "SPEAR ahead", "opsd": "SPEAR behind"
    }
    low, high = by_baseline["feedback_sft"]["interval_low"], by_baseline["feedback_sft"]["interval_high"]
    assert (low, high) == (pytest.approx(0.2 - 0.248413, abs=1e-6), pytest.approx(0.2 + 0.248413, abs=1e-6))
    assert by_baseline["grpo"]["interval_low"] == pytest.approx(0.11 - 0.0248413, abs=1e-6)
    assert by_baseline["opsd"]["mean_difference"] == pytest.approx(-0.11)
    # loglik_accuracy (half of accuracy here) is paired too, and comes first: the format-free metric
    assert [row["metric"] for row in result.paired] == ["loglik_accuracy"] * 3 + ["accuracy"] * 3
    halved = next(row for row in result.paired if row["metric"] == "loglik_accuracy" and row["baseline"] == "grpo")
    assert halved["mean_difference"] == pytest.approx(0.055) and halved["verdict"] == "SPEAR ahead"


def test_runs_pair_by_seed_over_the_seeds_both_methods_finished(tmp_path):
    # grpo has an extra seed 10 and lacks seed 7; only 8 and 9 pair, each with its own seed's run
    result = fake_comparison(tmp_path, {"grpo": {8: 0.3, 9: 0.5, 10: 0.9}, "spear": {7: 0.0, 8: 0.4, 9: 0.8}})
    row = next(row for row in result.paired if row["metric"] == "accuracy")
    assert result.reference == "spear" and row["baseline"] == "grpo"
    assert row["seeds"] == [8, 9] and row["num_seeds"] == 2
    assert row["differences"] == [pytest.approx(0.1), pytest.approx(0.3)]
    # mean 0.2, sd 0.1 * sqrt(2), half-width t(0.975, 1) * 0.1 = 1.2706: no clear difference
    assert row["interval_high"] - row["mean_difference"] == pytest.approx(1.2706205, abs=1e-6)
    assert row["verdict"] == "no clear difference"
    with open(tmp_path / "paired.csv", newline="") as file:
        lines = [line for line in csv.DictReader(file) if line["metric"] == "accuracy"]
    assert len(lines) == 1 and lines[0]["seeds"] == "8 9" and lines[0]["num_seeds"] == "2"
    assert [float(value) for value in lines[0]["differences"].split()] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert float(lines[0]["mean_difference"]) == pytest.approx(0.2)


def test_one_seed_gives_no_interval(tmp_path):
    result = fake_comparison(tmp_path, {"spear": {7: 0.6}, "grpo": {7: 0.4}})
    row = next(row for row in result.paired if row["metric"] == "accuracy")
    assert row["mean_difference"] == pytest.approx(0.2) and row["verdict"] == "one seed: no interval"
    assert row["interval_low"] is None and row["interval_high"] is None
    with open(tmp_path / "paired.csv", newline="") as file:
        line = next(line for line in csv.DictReader(file) if line["metric"] == "accuracy")
    assert (line["interval_low"], line["interval_high"], line["verdict"]) == ("", "", "one seed: no interval")
    assert "| accuracy | grpo | 1 | +0.200 |  | one seed: no interval | 7: +0.200 |" in (tmp_path / "comparison.md").read_text()


def test_without_spear_the_first_listed_method_is_the_reference(tmp_path):
    result = fake_comparison(tmp_path, {"grpo": {7: 0.5, 8: 0.6, 9: 0.7}, "opsd": {7: 0.4, 8: 0.49, 9: 0.58}})
    assert result.reference == "grpo"
    assert {row["baseline"] for row in result.paired} == {"opsd"}
    assert {row["verdict"] for row in result.paired} == {"grpo ahead"}
    assert "## Paired differences: grpo minus each baseline" in (tmp_path / "comparison.md").read_text()


def test_the_markdown_holds_the_paired_table_under_a_heading_with_its_caption(tmp_path):
    fake_comparison(tmp_path, {"spear": {7: 0.5, 8: 0.6, 9: 0.7}, "feedback_sft": {7: 0.4, 8: 0.4, 9: 0.4}})
    markdown = (tmp_path / "comparison.md").read_text()
    section = markdown[markdown.index("## Paired differences: spear minus each baseline"):]
    assert "| metric | baseline | seeds | mean difference | 95% interval | verdict | difference by seed |" in section
    assert "| accuracy | feedback_sft | 3 | +0.200 | [-0.048, +0.448] | no clear difference |" in section
    assert "7: +0.100, 8: +0.200, 9: +0.300" in section
    assert "paired t interval over seeds" in section
    assert markdown.index("](accuracy_by_compute.png)") < markdown.index("## Paired differences")


def test_a_single_method_has_nothing_to_pair(tmp_path):
    result = fake_comparison(tmp_path, {"spear": {7: 0.5, 8: 0.6}})
    assert result.paired == []
    assert (tmp_path / "paired.csv").read_text().startswith("reference,baseline,metric,")
    assert "One method compared: nothing to pair." in (tmp_path / "comparison.md").read_text()


def test_the_terminal_table_fits_100_columns_without_cutting_a_cell(tmp_path):
    finals = {name: {7: 0.5, 8: 0.6, 9: 0.7} for name in ("spear", "feedback_sft", "rltf_sd")}
    result = fake_comparison(tmp_path, finals | {"grpo": {7: 0.4, 8: 0.4, 9: 0.4}})
    rows = [row | {"metric": "cloze_norm_accuracy"} for row in result.paired]  # the longest metric name
    console = Console(width=100, record=True)
    console.print(paired_table(rows + [rows[0] | {"verdict": "one seed: no interval"}], result.reference))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    for cell in ("cloze_norm_accuracy", "feedback_sft", "no clear difference", "one seed: no interval", "[-0.048, +0.448]"):
        assert cell in text, cell


def test_shared_metrics_put_the_format_free_one_first_and_drop_what_a_run_lacks():
    assert ACCURACY_METRICS == ("accuracy", "loglik_accuracy", "loglik_norm_accuracy", "cloze_accuracy", "cloze_norm_accuracy")
    every = {"after": {metric: 0.5 for metric in ACCURACY_METRICS}}
    assert shared_metrics([every]) == [
        "loglik_accuracy", "accuracy", "loglik_norm_accuracy", "cloze_accuracy", "cloze_norm_accuracy"
    ]
    without_cloze = {"after": {"accuracy": 0.5, "loglik_accuracy": 0.5, "loglik_norm_accuracy": 0.5}}
    assert shared_metrics([every, without_cloze]) == ["loglik_accuracy", "accuracy", "loglik_norm_accuracy"]
    assert shared_metrics([{"after": {"accuracy": 0.5}}]) == ["accuracy"]
