"""The `spearfl` command through typer's CliRunner: a whole run on a primed tiny model, refusals, help."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import (
    end_to_end_assets,
    read_history,
    reference_run,
    single_thread,
    strip_timing,
    write_run_config,
)
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from spearfl.cli import app
from spearfl.config import config_to_dict, load_config
from spearfl.runtime.run_folder import RunFolder, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def invoke(*arguments: str):
    result = CliRunner().invoke(app, [str(argument) for argument in arguments])
    output = result.output + (result.stderr if result.stderr and result.stderr not in result.output else "")
    return result, " ".join(output.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def cli_run():
    """`spearfl run CONFIG` on 2 rounds x 2 clients; returns (result, output, config path, run folder)."""
    assets = end_to_end_assets()
    folder = assets.root / "cli-run"
    config_path = write_run_config(assets, assets.root / "cli.yaml", folder)
    with single_thread():
        result, output = invoke("run", config_path)
    return result, output, config_path, folder


def test_help_lists_the_commands():
    result, output = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "eval", "data"):
        assert f" {command} " in output


def test_run_writes_a_complete_run_folder(cli_run):
    result, output, config_path, folder = cli_run
    assert result.exit_code == 0, output
    assert "held-out accuracy" in output and str(folder) in output
    assert RunFolder(folder).read_config() == config_to_dict(load_config(config_path))
    history = read_history(folder)
    assert [row["round"] for row in history] == [0, 1, 2]
    summary = json.loads((folder / "summary.json").read_text())
    assert "accuracy" in summary["before"] and "accuracy" in summary["after"]
    assert "loglik_accuracy" in summary["before"]
    before, after = summary["before"], summary["after"]
    for title, key in (("option log-likelihood", "loglik_accuracy"), ("cloze", "cloze_accuracy")):
        assert f"{title} {before[key]:.3f} -> {after[key]:.3f}" in " ".join(output.split())
    assert json.loads((folder / "status.json").read_text())["state"] == "complete"
    adapters = {index: load_file(folder / "adapters" / f"round_{index:04d}.safetensors") for index in (0, 1, 2)}
    assert all(adapters[0].keys() == adapter.keys() and adapter for adapter in adapters.values())
    assert (folder / "accuracy.png").read_bytes().startswith(PNG_SIGNATURE)
    weights = [client["weight"] for row in history[1:] for client in row["clients"]]
    assert any(weight > 0 for weight in weights)
    assert any(not torch.equal(adapters[0][name], adapters[2][name]) for name in adapters[0])


def test_a_repeated_run_gives_the_same_history(cli_run):
    """Same seed, fresh folder (the reference run went through the Python API): the same rounds, bit for bit."""
    _, _, _, folder = cli_run
    reference = reference_run()
    assert reference != folder
    assert strip_timing(read_history(folder)) == strip_timing(read_history(reference))
    for index in (0, 1, 2):
        ours = load_file(folder / "adapters" / f"round_{index:04d}.safetensors")
        theirs = load_file(reference / "adapters" / f"round_{index:04d}.safetensors")
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_different_config_in_the_same_folder_is_refused(cli_run):
    _, _, config_path, folder = cli_run
    history_before = (folder / "history.jsonl").read_text()
    result, output = invoke("run", config_path, "--set", "seed=8")
    assert result.exit_code != 0
    assert "different config" in output and "seed" in output
    assert (folder / "history.jsonl").read_text() == history_before


def test_a_complete_run_is_not_run_again(cli_run):
    _, _, config_path, folder = cli_run
    history_before = (folder / "history.jsonl").read_text()
    result, output = invoke("run", config_path, "--quiet")
    assert result.exit_code == 0, output
    assert "already complete" in output
    assert (folder / "history.jsonl").read_text() == history_before


def test_an_unknown_key_fails_before_any_work(tmp_path):
    assets = end_to_end_assets()
    config_path = write_run_config(assets, tmp_path / "typo.yaml", tmp_path / "never")
    config_path.write_text(config_path.read_text() + "extra_section: {lamda_lose: 0.2}\n")
    result, output = invoke("run", config_path)
    assert result.exit_code != 0
    assert "extra_section" in output
    result, output = invoke("run", write_run_config(assets, tmp_path / "ok.yaml", tmp_path / "never"), "--set", "spear.lamda_lose=0.2")
    assert result.exit_code != 0
    assert "spear.lamda_lose" in output
    assert not (tmp_path / "never").exists()


def test_an_unknown_dataset_fails_naming_the_field(tmp_path):
    config_path = write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "never")
    result, output = invoke("run", config_path, "--set", "data.dataset=no_such_dataset")
    assert result.exit_code != 0 and "data.dataset" in output
    assert not (tmp_path / "never").exists()


def test_eval_scores_a_saved_adapter(cli_run):
    _, _, config_path, folder = cli_run
    result, output = invoke("eval", config_path, "--adapter", folder / "adapters" / "round_0002.safetensors")
    assert result.exit_code == 0, output
    after = json.loads((folder / "summary.json").read_text())["after"]
    assert "accuracy" in output and f"{after['accuracy']:.4f}" in output
    result, output = invoke("eval", config_path, "--adapter", folder / "no_such_adapter.safetensors")
    assert result.exit_code != 0 and "not found" in output


def test_bench_writes_its_report_and_profile(tmp_path):
    assets = end_to_end_assets()
    config_path = write_run_config(assets, tmp_path / "bench.yaml", tmp_path / "unused")
    output = tmp_path / "bench.json"
    result, text = invoke("bench", config_path, "--repeats", "1", "--round-repeats", "1", "--profile", "--output", output)
    assert result.exit_code == 0, text
    report = json.loads(output.read_text())
    assert {"targets", "rounds", "profile"} <= report.keys() and report["profile"].keys() == {"spear", "grpo"}
    assert "table" not in report["profile"]["spear"]  # the tables go to the text file
    assert "Self CPU" in (tmp_path / "bench.profile.txt").read_text() and "SPEAR / GRPO" in text


def test_a_bad_dataset_line_prints_one_message_and_leaves_the_folder_incomplete(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "2 + 2?", "answer": "4"}\n{"question": "Pick", "options": ["a"], "answer": "a"}\n')
    config_path = write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "run")
    result, output = invoke("run", config_path, "--set", f"data.dataset=jsonl:{data}")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert f"error: {data}, line 2, field 'options'" in output and "Traceback" not in output
    assert not RunFolder(tmp_path / "run").is_complete()


def test_python_dash_m_spearfl_is_the_command():
    completed = subprocess.run(
        [sys.executable, "-m", "spearfl", "run", "/no/such/config.yaml"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == "error: config file not found: /no/such/config.yaml"


def test_the_summary_table_reads_in_80_columns():
    shares = {f"option {index}": 0.2 for index in range(1, 6)}
    metrics = {"accuracy": 0.39, "answer_share": shares, "loglik_accuracy": 0.41, "loglik_answer_share": shares,
               "mean_completion_tokens": 2.18, "num_examples": 100, "parse_rate": 0.96}
    console = Console(width=80, record=True)
    console.print(summary_table({"before": metrics, "after": metrics}))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in "".join(lines)
    assert any(line.split("│")[1].strip() == "loglik_answer_share option 5" for line in lines if "│" in line)


def test_the_attack_bench_asks_for_one_mode_and_names_bad_choices(tmp_path):
    result, output = invoke("attack-bench")
    assert result.exit_code == 2 and "either a CONFIG.yaml" in output
    result, output = invoke("attack-bench", "--replay", tmp_path, "--attacks", "sign_flip,teleport")
    assert result.exit_code == 2 and "unknown attacks ['teleport']" in output
    result, output = invoke("attack-bench", "--replay", tmp_path, "--shares", "0.2,1.5")
    assert result.exit_code == 2 and "every share must lie in [0, 1)" in output
    result, output = invoke("attack-bench", "--replay", tmp_path)
    assert result.exit_code == 2 and "keep_client_updates" in output


def test_the_privacy_budget_is_the_accountants_and_bad_values_are_named():
    from spearfl.config import PrivacyConfig
    from spearfl.federated.privacy import affordable_rounds, epsilon_after

    result, output = invoke("privacy-budget", "--clients", 1000, "--per-round", 50, "--noise", 1.5, "--rounds", 40, "--budget", 2)
    settings = PrivacyConfig(mode="central", noise_multiplier=1.5, epsilon_budget=2)
    assert result.exit_code == 0
    for rounds in (10, 20, 40):
        assert f"{rounds} │ {epsilon_after(rounds, settings, 1000, 50):.4g}" in output
    assert f"epsilon 2 affords {affordable_rounds(settings, 1000, 50, 40)} of the 40 rounds" in output
    result, output = invoke("privacy-budget", "--clients", 10, "--per-round", 20, "--noise", 1)
    assert result.exit_code == 2 and "--per-round 20 exceeds --clients 10" in output
    result, output = invoke("privacy-budget", "--clients", 10, "--per-round", 5, "--noise", 0)
    assert result.exit_code == 2 and "--noise" in output and "greater than 0" in output


def test_data_lists_every_dataset_and_marks_the_ones_whose_source_is_missing(tmp_path, monkeypatch):
    """Without the bigbench archive (PyPI serves no 1.0.0), `spearfl data` still lists every dataset, marks the
    two it cannot build with the reason and the variable that supplies them, and exits 0."""
    from spearfl import cli
    from spearfl import data as data_package
    from spearfl.data import sources
    from spearfl.data.schema import Example

    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for bigbench==1.0.0\n")
    monkeypatch.setattr(sources.subprocess, "run", lambda *args, **kwargs: failed)
    monkeypatch.delenv(sources.BIGBENCH_ARCHIVE_VARIABLE, raising=False)
    monkeypatch.setenv("SPEARFL_CACHE", str(tmp_path))
    here = [Example(f"small/{index}", f"Question {index}?", ("yes", "no"), index % 2, label_style="text") for index in range(10)]
    small = sources.DatasetSpec("small", "CC0", "made by this test", "yes-no", "text", lambda cache_root: here)
    registry = {"strategyqa": sources.DATASETS["strategyqa"], "small": small, "math_mc": sources.DATASETS["math_mc"]}
    monkeypatch.setattr(sources, "DATASETS", registry)
    monkeypatch.setattr(data_package, "DATASETS", registry)
    monkeypatch.setattr(cli.console, "width", 250)  # one table row a line
    result, output = invoke("data", "--heldout-size", "4")
    assert result.exit_code == 0, output
    table = result.output.split("Sources", 1)[0]
    rows = {cells[0]: cells[1:] for line in table.splitlines() if (cells := [cell.strip() for cell in line.split("│")[1:-1]])}
    assert [name for name in rows if name in registry] == list(registry)
    assert rows["strategyqa"][:4] == ["yes-no", "unavailable", "-", "-"] and rows["math_mc"][1] == "unavailable"
    assert rows["small"] == ["yes-no", "10", "6", "4", "CC0"]
    missing = output.split("Not on this machine:", 1)[1]
    assert missing.count(sources.BIGBENCH_ARCHIVE_VARIABLE) == 2 and "No matching distribution" in missing
    assert "hint leak rates" in output
    assert not list(tmp_path.rglob("*strategyqa*"))  # nothing half-built is cached
