"""Faults that lose nothing: the server process killed with SIGKILL in the middle of a round, then restarted."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import end_to_end_assets, read_history, strip_timing, write_run_config

from spearfl.io import load_tensors

# screening, reputation, central differential privacy and a free-rider: every piece of server state a restart must keep
OVERRIDES = (
    "server.rounds=3", "server.clients_per_round=3", "eval.methods=[loglik]", "defense.screening=two_stage",
    "privacy.mode=central", "privacy.clip_norm=1.0", "privacy.noise_multiplier=0.3", "attacks=[{clients: [2], update: free_rider}]",
)


def spearfl_run(config_path, *extra: str) -> subprocess.Popen:
    arguments = [sys.executable, "-m", "spearfl", "run", str(config_path), "--quiet", *(f"--set={o}" for o in OVERRIDES), *extra]
    return subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def rounds_in(folder) -> list[int]:
    path = folder / "history.jsonl"
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_server_killed_mid_round_resumes_to_the_uninterrupted_run(tmp_path):
    assets = end_to_end_assets()
    config_path = write_run_config(assets, tmp_path / "run.yaml", tmp_path / "unused")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finished = spearfl_run(config_path, f"--set=output_dir={reference}")
    assert finished.wait(timeout=600) == 0, finished.stdout.read()

    process = spearfl_run(config_path, f"--set=output_dir={killed}")
    try:
        deadline = time.monotonic() + 600
        while 1 not in rounds_in(killed) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # into round 2's client training
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    status = json.loads((killed / "status.json").read_text())
    assert status["state"] == "running" and status["last_round"] == 1 and rounds_in(killed) == [0, 1]  # killed mid-round 2

    restarted = spearfl_run(config_path, f"--set=output_dir={killed}")
    assert restarted.wait(timeout=600) == 0, restarted.stdout.read()
    assert strip_timing(read_history(killed)) == strip_timing(read_history(reference))
    for round_index in (0, 1, 2, 3):
        ours, theirs = load_tensors(killed / "adapters" / f"round_{round_index:04d}.safetensors"), load_tensors(
            reference / "adapters" / f"round_{round_index:04d}.safetensors"
        )
        assert all(ours[name].equal(theirs[name]) for name in theirs)
    summary, expected = (json.loads((folder / "summary.json").read_text()) for folder in (killed, reference))
    assert summary["privacy"] == expected["privacy"] and summary["privacy"]["epsilon"] > 0
    assert [row["privacy"]["epsilon"] for row in read_history(killed)[1:]] == sorted({row["privacy"]["epsilon"] for row in read_history(killed)[1:]})
