import io
import os

import pytest
import torch
from rich.console import Console

import spearfl.runtime.run_folder
from spearfl.federated.aggregation import ServerOptimizerState, initial_server_state
from spearfl.io import load_tensors
from spearfl.runtime.run_folder import RunFolder, plot_accuracy, summary_table


def history_row(round_index, evaluate=False):
    row = {
        "round": round_index,
        "lr": 5e-5,
        "clients": [{"client": 3, "weight": 2, "metrics": {"wins": 2}}, {"client": 8, "weight": 0, "metrics": {}}],
        "online": {"first_try_accuracy": 0.1 * round_index, "revision_success": 0.5, "wins": 2, "losses": 4},
    }
    if evaluate:
        row["eval"] = {"accuracy": 0.2 + 0.05 * round_index, "loglik_accuracy": 0.3, "num_examples": 40}
    return row


def temporary_files(folder):
    return [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


def adapter(value):
    return {"layers.0.q_proj.lora_A.weight": torch.full((2, 3), value)}


def test_config_round_trips_in_key_order(tmp_path):
    folder = RunFolder(tmp_path / "run")
    config = {"seed": 0, "server": {"strategy": "fedavg", "rounds": 3}, "algorithm": "spear"}
    folder.write_config(config)
    assert folder.read_config() == config
    assert list(folder.read_config()) == ["seed", "server", "algorithm"]


def test_status_lifecycle(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_status() is None and not folder.is_complete()
    with pytest.raises(ValueError):
        folder.write_status("complete", 0)  # nothing ran yet
    folder.write_status("running", 0)
    folder.write_status("running", 1)
    folder.write_status("interrupted", 1, "stopped by user")
    assert folder.read_status()["message"] == "stopped by user"
    assert not folder.is_complete()
    with pytest.raises(ValueError):
        folder.write_status("complete", 1)  # a resume must run again first
    folder.write_status("running", 1)
    folder.write_status("complete", 2)
    assert folder.is_complete()
    assert folder.read_status()["last_round"] == 2
    with pytest.raises(ValueError):
        folder.write_status("failed", 2)  # a late error handler cannot undo completion
    with pytest.raises(ValueError):
        folder.write_status("done", 2)


def test_history_appends_in_round_order(tmp_path):
    folder = RunFolder(tmp_path)
    for round_index in (1, 2, 3):
        folder.append_history(history_row(round_index, evaluate=round_index == 2))
    rows = folder.read_history()
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert rows[1]["eval"]["accuracy"] == pytest.approx(0.3)
    assert len(folder.history_path.read_text().splitlines()) == 3
    with pytest.raises(ValueError):
        folder.append_history(history_row(3))


def test_rewind_truncates_history_and_adapters_beyond_the_checkpoint(tmp_path):
    folder = RunFolder(tmp_path)
    for round_index in range(1, 6):
        folder.append_history(history_row(round_index))
        folder.save_adapter(round_index, adapter(float(round_index)))
    folder.rewind_to(3)
    assert [row["round"] for row in folder.read_history()] == [1, 2, 3]
    assert sorted(path.name for path in folder.adapters_dir.iterdir()) == [
        "round_0001.safetensors",
        "round_0002.safetensors",
        "round_0003.safetensors",
    ]
    torch.testing.assert_close(load_tensors(folder.adapter_path(3)), adapter(3.0))
    folder.append_history(history_row(4))  # the resumed run logs round 4 again
    assert [row["round"] for row in folder.read_history()] == [1, 2, 3, 4]


def test_checkpoint_round_trip_keeps_only_the_latest(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.load_checkpoint() is None
    folder.save_checkpoint(1, adapter(1.0), initial_server_state(), {"note": "fedavg keeps no moments"})
    server_state = ServerOptimizerState(adapter(0.1), adapter(0.2), num_steps=2)
    folder.save_checkpoint(2, adapter(2.0), server_state, {"generator": [1, 2, 3]})
    checkpoint = folder.load_checkpoint()
    assert checkpoint.round_index == 2
    assert checkpoint.info == {"generator": [1, 2, 3]}
    torch.testing.assert_close(checkpoint.global_state, adapter(2.0))
    torch.testing.assert_close(checkpoint.server_state.first_moment, adapter(0.1))
    torch.testing.assert_close(checkpoint.server_state.second_moment, adapter(0.2))
    assert checkpoint.server_state.num_steps == 2
    assert len([path for path in folder.checkpoint_dir.iterdir() if path.is_dir()]) == 1
    assert temporary_files(tmp_path) == []


def test_empty_server_state_checkpoint(tmp_path):
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(0, adapter(0.0), initial_server_state(), {})
    assert folder.load_checkpoint().server_state == initial_server_state()


def test_failed_checkpoint_leaves_the_last_good_one(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(4, adapter(4.0), initial_server_state(), {})
    real_save = spearfl.runtime.run_folder.save_tensors

    def fail_on_server_state(path, tensors, metadata=None):
        if "server_state" in str(path):
            raise OSError("disk full")
        real_save(path, tensors, metadata)

    monkeypatch.setattr(spearfl.runtime.run_folder, "save_tensors", fail_on_server_state)
    with pytest.raises(OSError):
        folder.save_checkpoint(5, adapter(5.0), initial_server_state(), {})
    checkpoint = folder.load_checkpoint()
    assert checkpoint.round_index == 4
    torch.testing.assert_close(checkpoint.global_state, adapter(4.0))

    monkeypatch.setattr(spearfl.runtime.run_folder, "save_tensors", real_save)
    folder.save_checkpoint(5, adapter(5.0), initial_server_state(), {})
    assert folder.load_checkpoint().round_index == 5
    assert len([path for path in folder.checkpoint_dir.iterdir() if path.is_dir()]) == 1  # leftover removed


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    folder.write_summary({"accuracy": 0.25}, {"accuracy": 0.5})
    folder.append_history(history_row(1))

    def fail(source, destination):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        folder.write_summary({"accuracy": 0.0}, {"accuracy": 0.0})
    with pytest.raises(OSError):
        folder.append_history(history_row(2))
    monkeypatch.undo()
    assert folder.read_summary()["after"] == {"accuracy": 0.5}
    assert [row["round"] for row in folder.read_history()] == [1]
    assert temporary_files(tmp_path) == []


def test_summary_before_after_and_delta(tmp_path):
    folder = RunFolder(tmp_path)
    before = {"accuracy": 0.25, "loglik_accuracy": 0.5, "method": "generate"}
    after = {"accuracy": 0.375, "loglik_accuracy": 0.5, "method": "generate"}
    folder.write_summary(before, after, {"algorithm": "spear", "rounds": 10})
    summary = folder.read_summary()
    assert summary["before"] == before and summary["after"] == after
    assert summary["delta"] == {"accuracy": 0.125, "loglik_accuracy": 0.0}
    assert summary["algorithm"] == "spear" and summary["rounds"] == 10
    with pytest.raises(ValueError):
        folder.write_summary(before, after, {"before": {}})


def test_summary_table_shows_before_after_delta():
    summary = {"before": {"accuracy": 0.25, "parse_rate": 0.9}, "after": {"accuracy": 0.375, "extra": 1.0}}
    table = summary_table(summary)
    assert [column.header for column in table.columns] == ["metric", "before", "after", "delta"]
    assert table.row_count == 3
    console = Console(file=io.StringIO(), width=100)
    console.print(table)
    text = console.file.getvalue()
    assert "0.2500" in text and "0.3750" in text and "+0.1250" in text


def test_plot_accuracy_writes_a_png(tmp_path):
    rows = [history_row(round_index, evaluate=round_index % 2 == 0) for round_index in range(1, 6)]
    path = tmp_path / "plots" / "accuracy.png"
    plot_accuracy(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert temporary_files(tmp_path) == []


def testaccuracy_series_picks_accuracy_metrics_only():
    rows = [history_row(1), history_row(2, evaluate=True)]
    series = spearfl.runtime.run_folder.accuracy_series(rows)
    assert set(series) == {"eval/accuracy", "eval/loglik_accuracy", "online/first_try_accuracy"}
    assert series["eval/accuracy"] == ([2], [pytest.approx(0.3)])
    assert series["online/first_try_accuracy"][0] == [1, 2]


def test_summarize_runs_gives_mean_and_sample_spread_of_each_delta():
    from rich.console import Console

    from spearfl.runtime.run_folder import summarize_runs

    runs = [
        ("a", {"before": {"accuracy": 0.2}, "after": {"accuracy": 0.5}}),
        ("b", {"before": {"accuracy": 0.2}, "after": {"accuracy": 0.3}}),
    ]
    console = Console(width=200, record=True)
    console.print(summarize_runs(runs))
    text = console.export_text()
    # deltas 0.3 and 0.1: mean 0.2, sample standard deviation sqrt(0.02) = 0.141
    assert "0.200 ± 0.141" in text and "+0.300 +0.100" in text and "0.400 ± 0.141" in text
