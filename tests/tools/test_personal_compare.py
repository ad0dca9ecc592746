"""`spearfl compare --personal`: each method scored with the adapter it answers each client with, on the clients'
own held-out data, and TAP paired against each other method seed by seed."""

import math

import pytest
from typer.testing import CliRunner

from spearfl.cli import app
from spearfl.config import ConfigError
from spearfl.runtime.run_folder import RunFolder
from spearfl.tools.personal_compare import parse_methods, write_personal_comparison

T_975_2 = 4.302653  # t quantile 0.975 at 2 degrees of freedom, from a printed table


def fake_run(output, method, seed, clients, heldout=0.5) -> RunFolder:
    """A finished run folder: `clients` is [(global accuracy, personal accuracy or None)] per client."""
    run = RunFolder(output / method / f"seed{seed}")
    run.path.mkdir(parents=True)
    run.write_config({"seed": seed, "personal": {"method": method}})
    rows = []
    for client, (global_accuracy, personal_accuracy) in enumerate(clients):
        row = {"client": client, "global": {"accuracy": global_accuracy, "loglik_accuracy": global_accuracy / 2}}
        if personal_accuracy is not None:
            row["personal"] = {"accuracy": personal_accuracy, "loglik_accuracy": personal_accuracy / 2}
        rows.append(row)
    after = {"accuracy": heldout, "loglik_accuracy": heldout / 2}
    run.write_summary(after, after, {"clients": {"per_client": rows}})
    return run


def test_methods_are_scored_with_the_adapter_they_answer_with_and_tap_is_paired_seed_by_seed(tmp_path):
    folders = {
        # TAP: personal beats global on client 0, loses 0.1 on client 1; means 0.65, 0.75, 0.85 over seeds
        "tap": [fake_run(tmp_path, "tap", seed, [(0.5, 0.8 + 0.1 * seed), (0.6, 0.5 + 0.1 * seed)]) for seed in range(3)],
        # none: scored with the global adapter; means 0.5, 0.55, 0.6
        "none": [fake_run(tmp_path, "none", seed, [(0.4 + 0.05 * seed, None), (0.6 + 0.05 * seed, None)]) for seed in range(3)],
    }
    result = write_personal_comparison(folders, tmp_path)
    tap, none = result.rows
    assert tap["accuracy_mean_mean"] == pytest.approx(0.75) and tap["accuracy_mean_std"] == pytest.approx(0.1)
    assert tap["accuracy_worst_mean"] == pytest.approx(0.6)  # client 1's 0.5, 0.6, 0.7
    assert tap["accuracy_global_mean_mean"] == pytest.approx(0.55)
    assert tap["accuracy_worst_drop_mean"] == pytest.approx((0.1 + 0.0 - 0.1) / 3)  # 0.6 - 0.5, 0.6 - 0.6, 0.6 - 0.7
    assert none["accuracy_mean_mean"] == pytest.approx(0.55) and none["accuracy_worst_drop_mean"] == 0
    assert result.reference == "tap"
    row = next(row for row in result.paired if row["metric"] == "accuracy")
    # differences 0.15, 0.2, 0.25: mean 0.2, sd 0.05, half-width t(0.975, 2) 0.05 / sqrt(3)
    assert row["differences"] == pytest.approx([0.15, 0.2, 0.25])
    assert row["interval_low"] == pytest.approx(0.2 - T_975_2 * 0.05 / math.sqrt(3), rel=1e-6)
    assert row["verdict"] == "tap ahead"
    written = (tmp_path / "personal.md").read_text()
    assert "largest drop below global" in written and "tap ahead" in written
    assert (tmp_path / "clients_by_method.png").stat().st_size > 0 and (tmp_path / "personal_paired.csv").exists()


def test_a_run_without_per_client_evaluation_is_refused_by_name(tmp_path):
    run = RunFolder(tmp_path / "none" / "seed0")
    run.path.mkdir(parents=True)
    run.write_config({"seed": 0})
    run.write_summary({"accuracy": 0.1}, {"accuracy": 0.1}, {})
    with pytest.raises(ConfigError, match="none: a run has no per-client evaluation"):
        write_personal_comparison({"none": [run]}, tmp_path)


def test_method_names_are_checked_up_front():
    assert parse_methods("tap, none,local") == ["tap", "none", "local"]
    for text, message in (("tap,tap", "listed twice"), ("tap,fedprox", "unknown 'fedprox'"), (" , ", "at least one")):
        with pytest.raises(ConfigError, match=message):
            parse_methods(text)


def test_the_command_takes_algorithms_or_personalization_methods_not_both(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["compare", "configs/personal.yaml", "--algorithms", "spear", "--personal", "tap"])
    assert result.exit_code == 2 and "either --algorithms" in result.output
    result = runner.invoke(app, ["compare", "configs/personal.yaml", "--personal", "tap", "--set", "data.client_heldout_fraction=0",
                                 "--output", str(tmp_path)])
    assert result.exit_code != 0 and "data.client_heldout_fraction" in result.output
