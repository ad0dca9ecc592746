"""Utility against privacy: the sweep's configs, and a small sweep on the primed tiny model."""

import json

import pytest
from helpers import end_to_end_assets, single_thread, write_run_config

from spearfl.config import load_config
from spearfl.federated.privacy import epsilon_after
from spearfl.tools.privacy_sweep import privacy_sweep, sweep_config, sweep_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def config(tmp_path):
    assets = end_to_end_assets()
    overrides = ["server.rounds=1", "eval.methods=[loglik]", "privacy.clip_norm=0.5"]
    return load_config(write_run_config(assets, tmp_path / "run.yaml", tmp_path / "unused"), overrides)


def test_noise_zero_is_the_run_without_dp_and_the_rest_central(config, tmp_path):
    plain, noised = sweep_config(config, 0, tmp_path), sweep_config(config, 0.3, tmp_path)
    assert plain.privacy.mode == "none" and plain.output_dir.endswith("noise-0")
    assert (noised.privacy.mode, noised.privacy.noise_multiplier, noised.privacy.clip_norm) == ("central", 0.3, 0.5)
    assert noised.output_dir.endswith("noise-0.3")


def test_the_table_says_no_dp_for_the_reference():
    rows = [{"noise_multiplier": 0.0, "epsilon": None, "loglik_accuracy": 0.5, "accuracy": None},
            {"noise_multiplier": 1.0, "epsilon": 25.93, "loglik_accuracy": 0.25, "accuracy": 0.125}]
    assert sweep_markdown(rows).splitlines()[2:] == ["| 0 | no DP | 0.500 | - |", "| 1 | 25.9 | 0.250 | 0.125 |"]


@pytest.mark.slow
def test_a_sweep_runs_each_noise_and_reports_the_accountants_epsilon(config, tmp_path):
    with single_thread():
        rows = privacy_sweep(config, [2.0, 0], tmp_path / "sweep", show_progress=False)
    assert [row["noise_multiplier"] for row in rows] == [0.0, 2.0]
    private = sweep_config(config, 2.0, tmp_path).privacy
    assert rows[0]["epsilon"] is None
    assert rows[1]["epsilon"] == pytest.approx(epsilon_after(1, private, config.data.num_clients, config.server.clients_per_round))
    assert rows[0]["base_loglik_accuracy"] == rows[1]["base_loglik_accuracy"]  # one base model, evaluated once
    saved = json.loads((tmp_path / "sweep" / "privacy-sweep.json").read_text())
    assert saved["figures"] == rows and "clip 0.5" in saved["setting"]
    assert (tmp_path / "sweep" / "privacy-sweep.png").read_bytes().startswith(PNG_SIGNATURE)
    history = [json.loads(line) for line in (tmp_path / "sweep" / "noise-2" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["privacy"]["epsilon"] == pytest.approx(rows[1]["epsilon"])
