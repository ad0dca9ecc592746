"""Faults that lose nothing: the server process killed with SIGKILL in the middle of a round, then restarted."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import end_to_end_assets, read_history, strip_timing, write_run_config

from spearfl.io import load_tensors

ROUNDS = ("server.rounds=3", "server.clients_per_round=3", "eval.methods=[loglik]")
# screening, reputation and a free-rider: the server state a restart must keep, in a run that repeats exactly
OVERRIDES = (*ROUNDS, "defense.screening=two_stage", "attacks=[{clients: [2], update: free_rider}]")
# central DP: its noise comes from the OS, so a restart keeps the accountant's rounds rather than repeating the noise
PRIVATE = (*ROUNDS, "privacy.mode=central", "privacy.clip_norm=1.0", "privacy.noise_multiplier=0.3")


def spearfl_run(config_path, *extra: str, overrides=OVERRIDES) -> subprocess.Popen:
    arguments = [sys.executable, "-m", "spearfl", "run", str(config_path), "--quiet", *(f"--set={o}" for o in overrides), *extra]
    return subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def rounds_in(folder) -> list[int]:
    path = folder / "history.jsonl"
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def kill_in_round_two(config_path, folder, overrides=OVERRIDES) -> None:
    """Start the run, SIGKILL it while round 2's clients train, check it was caught mid-round, and restart it."""
    process = spearfl_run(config_path, f"--set=output_dir={folder}", overrides=overrides)
    try:
        deadline = time.monotonic() + 600
        while 1 not in rounds_in(folder) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # into round 2's client training
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "running" and status["last_round"] == 1 and rounds_in(folder) == [0, 1]  # killed mid-round 2
    restarted = spearfl_run(config_path, f"--set=output_dir={folder}", overrides=overrides)
    assert restarted.wait(timeout=600) == 0, restarted.stdout.read()


def test_a_server_killed_mid_round_resumes_to_the_uninterrupted_run(tmp_path):
    assets = end_to_end_assets()
    config_path = write_run_config(assets, tmp_path / "run.yaml", tmp_path / "unused")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finished = spearfl_run(config_path, f"--set=output_dir={reference}")
    assert finished.wait(timeout=600) == 0, finished.stdout.read()
    kill_in_round_two(config_path, killed)
    assert strip_timing(read_history(killed)) == strip_timing(read_history(reference))
    for round_index in (0, 1, 2, 3):
        ours, theirs = load_tensors(killed / "adapters" / f"round_{round_index:04d}.safetensors"), load_tensors(
            reference / "adapters" / f"round_{round_index:04d}.safetensors"
        )
        assert all(ours[name].equal(theirs[name]) for name in theirs)
    history = read_history(killed)
    assert any(row.get("screening") for row in history)
    # from round 2 on, screening compares each update with the last global step, which the restart read back
    assert all({"alignment", "novelty"} <= set(record["indicators"]) for row in history[2:] for record in row["screening"])


def test_a_private_run_killed_mid_round_keeps_its_accountant(tmp_path):
    """The restart composes round 2 once: the epsilons are those of 1, 2 and 3 rounds, as an unbroken run's."""
    from spearfl.config import load_config
    from spearfl.federated.privacy import epsilon_after

    assets = end_to_end_assets()
    config_path = write_run_config(assets, tmp_path / "run.yaml", tmp_path / "unused")
    killed = tmp_path / "killed"
    kill_in_round_two(config_path, killed, overrides=PRIVATE)
    config = load_config(config_path, list(PRIVATE))
    expected = [epsilon_after(rounds, config.privacy, config.data.num_clients, config.server.clients_per_round) for rounds in (1, 2, 3)]
    history = read_history(killed)
    assert [row["round"] for row in history] == [0, 1, 2, 3]
    assert [row["privacy"]["epsilon"] for row in history[1:]] == expected
    assert json.loads((killed / "summary.json").read_text())["privacy"]["epsilon"] == expected[-1]
    assert all(set(entry) == {"client"} for row in history[1:] for entry in row["clients"])  # nothing of a single update
