"""spearfl on Flower: a deployment (SuperLink, SuperNodes and client workers as real processes on 127.0.0.1) and
the simulation engine, each run through `flwr run` and compared with the local runtime on the same config."""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from flower_processes import (
    APP,
    Processes,
    flwr,
    run_app,
    run_id_of,
    run_status,
    free_port,
    start_superlink,
    start_supernode,
    start_worker,
)
from helpers import (
    end_to_end_assets,
    read_history,
    run_config_text,
    single_thread,
    strip_timing,
)

from spearfl.config import config_to_dict, load_config
from spearfl.io import load_tensors
from spearfl.runtime.local import run_local
from spearfl.runtime.run_folder import RunFolder

pytestmark = pytest.mark.flower

NUM_CLIENTS = 2
TOLERANCE = 1e-6  # float32 adapters; the same arithmetic runs in other processes


# FedPer with the top one of the tiny model's two layers the client's own: a round starts from the client's own
# top layer, so a run reproduces the local runtime's only if each client's personal state lasts between rounds
PERSONAL = "personal: {method: fedper, fedper_local_layers: 1}\n"


def write_config(tmp_path: Path, output_dir: Path, upload_encoding: str = "float32", personal: str = "") -> Path:
    """The end-to-end test config (2 rounds, tiny primed model) with two clients, both chosen every round."""
    text = run_config_text(end_to_end_assets(), output_dir).replace("num_clients: 3", f"num_clients: {NUM_CLIENTS}")
    text = text.replace("clients_per_round: 2}", f"clients_per_round: 2, upload_encoding: {upload_encoding}}}")
    path = tmp_path / f"{output_dir.name}.yaml"
    path.write_text(text + "threads: 1\n" + personal)
    return path


def run_locally(root: Path, upload_encoding: str, personal: str = "") -> Path:
    config = load_config(write_config(root, root / f"local-{upload_encoding}", upload_encoding, personal))
    with single_thread():
        run_local(config, show_progress=False)
    return root / f"local-{upload_encoding}"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    return run_locally(tmp_path_factory.mktemp("local"), "float32")


@pytest.fixture(scope="module")
def local_bfloat16_reference(tmp_path_factory) -> Path:
    return run_locally(tmp_path_factory.mktemp("local"), "bfloat16", PERSONAL)


def assert_same_as_local(folder: Path, reference: Path) -> None:
    """The same run folder files, the same history but for timings, and the same global adapters."""
    run = RunFolder(folder)
    assert run.read_status()["state"] == "complete"
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "history.jsonl", "summary.json", "accuracy.png", "adapters", "checkpoint"}
    flower_history, local_history = read_history(folder), read_history(reference)
    assert [row["round"] for row in flower_history] == [0, 1, 2]
    assert any(client["weight"] > 0 for row in flower_history for client in row["clients"])
    assert strip_timing(flower_history) == strip_timing(local_history)
    for round_index in (0, 1, 2):
        got, expected = load_tensors(run.adapter_path(round_index)), load_tensors(RunFolder(reference).adapter_path(round_index))
        assert got.keys() == expected.keys()
        assert all(torch.allclose(got[name], expected[name], rtol=0, atol=TOLERANCE) for name in expected), round_index
    moved = load_tensors(RunFolder(reference).adapter_path(2))
    assert any(not torch.equal(moved[name], load_tensors(RunFolder(reference).adapter_path(0))[name]) for name in moved)


def test_a_deployment_run_matches_the_local_runtime(tmp_path, local_reference):
    """SuperLink + two SuperNodes, each with its client worker, two rounds through `flwr run`."""
    config_path = write_config(tmp_path, tmp_path / "flower-run")
    processes = Processes(tmp_path)
    try:
        superlink = free_port()
        start_superlink(processes, superlink)
        worker_ports = []
        for client in range(NUM_CLIENTS):
            worker = start_worker(processes, client)
            worker_ports.append(worker)
            node_config = f"partition-id={client} num-partitions={NUM_CLIENTS} worker='127.0.0.1:{worker}'"
            start_supernode(processes, superlink, node_config, client)
        run_app(processes, tmp_path / "flwr-cli", "spearfl-test", superlink, config_path)
        for port in worker_ports:  # each device loaded its model once and kept it for both rounds
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as health:
                assert json.load(health)["models_loaded"] == 1
        assert_same_as_local(tmp_path / "flower-run", local_reference)
    finally:
        leftover = processes.stop()
    assert leftover == [], f"processes still running: {leftover}"
    assert all(process.poll() is not None for process in processes.started)


def local_superlinks(port: int) -> list[psutil.Process]:
    """The SuperLink `flwr run` starts for the simulation engine listens on `port` and outlives the run."""
    owners = {c.pid for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"}
    return [psutil.Process(pid) for pid in owners if pid]


def test_a_simulation_run_matches_the_local_runtime(tmp_path, local_bfloat16_reference, monkeypatch):
    """`flwr run` on the local simulation engine, two virtual SuperNodes, two rounds, bfloat16 uploads, and FedPer's
    personal modules carried in each node's state from round 1 to round 2."""
    config_path = write_config(tmp_path, tmp_path / "elsewhere", "bfloat16", PERSONAL)  # `set` moves the run folder below
    home, port = tmp_path / "flwr-sim", free_port()
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(port))
    superlinks: list[psutil.Process] = []
    try:
        started = flwr(
            home, "run", str(APP), "--stream", "--run-config", f"config='{config_path}' set='output_dir={tmp_path / 'simulation-run'}'",
            "--federation-config", f"num-supernodes={NUM_CLIENTS} client-resources-num-cpus=1",
        )
        superlinks = local_superlinks(port)
        assert started.returncode == 0, started.stdout + started.stderr
        assert run_status(home, run_id_of(started.stdout)) == "finished:completed", started.stdout
        assert_same_as_local(tmp_path / "simulation-run", local_bfloat16_reference)
    finally:
        family = [p for link in superlinks for p in [link, *link.children(recursive=True)]]
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):  # it may exit between the listing and the signal
                process.terminate()
        _, alive = psutil.wait_procs(family, timeout=20)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


# Secure aggregation's quantization error: each client's weighted update (weight / prompts asked, at most 1) is
# rounded stochastically to a grid of step 2 x clipping_range / quantization_range = 2 / 2**22 = 4.8e-7, off by
# less than one step, and the mean divides the sum of 3 such errors by the summed weight shares (3 x 6 / 6 = 3):
# a round differs from the same round without secure aggregation, from the same adapter, by less than one step
# (float32 rounding of values near 0.05 adds < 1e-8).
QUANTIZATION_TOLERANCE = 5e-7


def secure_config(tmp_path: Path, output_dir: Path, secure: bool) -> Path:
    """The end-to-end config with 3 clients, all chosen every round, with or without secure aggregation."""
    server = "clients_per_round: 3" + (", secure_aggregation: secaggplus" if secure else "")
    text = run_config_text(end_to_end_assets(), output_dir).replace("clients_per_round: 2", server)
    path = tmp_path / f"{output_dir.name}.yaml"
    path.write_text(text + "threads: 1\n")
    return path


def test_a_secure_aggregation_run_matches_the_local_runtime_within_quantization(tmp_path):
    """SecAgg+ over a SuperLink and three SuperNodes (each with its client worker), two rounds, against the local
    runtime without secure aggregation."""
    with single_thread():
        run_local(load_config(secure_config(tmp_path, tmp_path / "local-run", secure=False)), show_progress=False)
    config_path = secure_config(tmp_path, tmp_path / "secure-run", secure=True)
    processes = Processes(tmp_path)
    try:
        superlink = free_port()
        start_superlink(processes, superlink)
        for client in range(3):
            worker = start_worker(processes, client)
            start_supernode(processes, superlink, f"partition-id={client} num-partitions=3 worker='127.0.0.1:{worker}'", client)
        run_app(processes, tmp_path / "flwr-cli", "spearfl-secure", superlink, config_path)
    finally:
        leftover = processes.stop()
    assert leftover == [], f"processes still running: {leftover}"
    secure, local = RunFolder(tmp_path / "secure-run"), RunFolder(tmp_path / "local-run")
    assert secure.read_status()["state"] == "complete"
    secure_history, local_history = read_history(secure.path), read_history(local.path)
    for got, expected in zip(secure_history[1:], local_history[1:]):
        assert "rejected" not in got
        assert [(c["client"], c["weight"]) for c in got["clients"]] == [(c["client"], c["weight"]) for c in expected["clients"]]
        assert all(c["metrics"]["upload_bytes"] > 0 for c in got["clients"])
    # Round 1 against the local run; round 2 against a local round 2 trained from the secure run's round-1 adapter.
    # (Against the local run's own round 2 the difference is not bounded by the quantization: AdamW divides each
    # gradient by its running scale, so a value whose gradient is near zero moves far more than round 1's
    # perturbation, by an amount that depends on the machine.)
    from_secure = local_round_two_from(secure, local, tmp_path)
    differences = []
    for round_index, expected_run in ((1, local), (2, from_secure)):
        got, expected = load_tensors(secure.adapter_path(round_index)), load_tensors(expected_run.adapter_path(round_index))
        start = load_tensors(expected_run.adapter_path(round_index - 1))
        difference = torch.cat([(got[name] - expected[name]).flatten() for name in expected])
        update = torch.cat([(expected[name] - start[name]).flatten() for name in expected])
        assert float(update.abs().max()) > 1e-3, round_index  # the comparison is not of two unmoved adapters
        differences.append((float(difference.abs().max()), float(difference.norm() / update.norm())))
    print(f"secure against local, per round (largest difference, norm relative to the round's update): {differences}")
    assert all(largest < QUANTIZATION_TOLERANCE for largest, _ in differences), differences


def local_round_two_from(secure: RunFolder, local: RunFolder, tmp_path: Path) -> RunFolder:
    """The local run's config resumed after round 1 from the secure run's round-1 adapter (FedAvg keeps no server
    state, and nothing else in the checkpoint differs), in a folder of its own."""
    checkpoint = local.load_checkpoint()
    assert checkpoint.server_state.num_steps == 0 and not checkpoint.server_state.first_moment  # FedAvg: stateless
    config = load_config(secure_config(tmp_path, tmp_path / "from-secure", secure=False))
    folder = RunFolder(config.output_dir)
    shutil.copytree(local.path, folder.path)
    shutil.rmtree(folder.checkpoint_dir)
    folder.write_config(config_to_dict(config))
    secure_round_one = load_tensors(secure.adapter_path(1))
    folder.save_adapter(1, secure_round_one)
    folder.save_checkpoint(1, secure_round_one, checkpoint.server_state, {**checkpoint.info, "round": 1})
    folder.status_path.unlink()
    folder.write_status("interrupted", last_round=1)
    with single_thread():
        run_local(config, show_progress=False)
    assert folder.read_status()["state"] == "complete"
    return folder
