"""Rounds until stopped (server.rounds: null, for live devices): a constant rate after the warm-up, and a stop that
leaves the summary and plot of the rounds so far, from which the next run continues."""

import pytest
from helpers import end_to_end_assets, read_history, single_thread, write_run_config

from spearfl.config import ConfigError, load_config
from spearfl.federated.schedule import learning_rate
from spearfl.io import read_json
from spearfl.runtime.local import InProcessClients
from spearfl.runtime.server import FederatedRun
from spearfl.runtime.setup import check_config


def test_until_stopped_the_rate_warms_up_then_stays():
    assert [learning_rate(r, None, 1.0, 2, 0.2) for r in (1, 2, 3, 500)] == [0.5, 1.0, 1.0, 1.0]
    assert learning_rate(7, None, 0.3, 0, 0.0) == 0.3


def test_until_stopped_needs_live_devices():
    with pytest.raises(ConfigError, match="server.rounds"):
        check_config(load_config(None, ["server.rounds=null"]))


def stopping_at(stop_round):
    """InProcessClients whose choice of clients for `stop_round` is interrupted, as Ctrl-C would."""

    class Stopping(InProcessClients):
        def choose(self, round_index):
            if round_index == stop_round:
                raise KeyboardInterrupt
            return super().choose(round_index)

    return Stopping


def test_a_stopped_open_ended_run_has_its_summary_and_continues(tmp_path):
    assets = end_to_end_assets()
    config = load_config(write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run"),
                         ["server.rounds=null", "eval.every=2", "eval.methods=[loglik]"])
    with single_thread():
        summary = FederatedRun(config, stopping_at(3), show_progress=False).run()
        assert summary["rounds"] == 2 and summary["after"] == read_history(tmp_path / "run")[2]["eval"]
        status = read_json(tmp_path / "run" / "status.json")
        assert status["state"] == "interrupted" and status["last_round"] == 2 and "continue" in status["message"]
        assert (tmp_path / "run" / "accuracy.png").is_file()
        summary = FederatedRun(config, stopping_at(5), show_progress=False).run()
    assert [row["round"] for row in read_history(tmp_path / "run")] == [0, 1, 2, 3, 4]
    assert summary["rounds"] == 4 and all(row["lr"] == 0.01 for row in read_history(tmp_path / "run")[1:])
