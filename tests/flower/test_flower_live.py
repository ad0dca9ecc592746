"""The live loop on Flower: a SuperLink and two SuperNodes as real processes on 127.0.0.1, each SuperNode's ClientApp
relaying to a device service (node config `service`) whose simulated people asked and judged; `flwr run` with
`live.on_flower` trains on exactly those interactions, consumes them once, and every device then answers with the
run's final adapter."""

from __future__ import annotations

import pytest
import torch
from flower_processes import (
    Processes,
    free_port,
    run_app,
    start_superlink,
    start_supernode,
)
from helpers import end_to_end_assets, read_history, run_config_text, single_thread

from spearfl.config import load_config
from spearfl.data.sources import load_jsonl
from spearfl.feedback.providers import make_oracle
from spearfl.io import load_tensors
from spearfl.serve.device import ServiceThread, build_service
from spearfl.serve.simulate import deal, simulate_people

pytestmark = pytest.mark.flower


def test_a_flower_run_trains_devices_on_their_peoples_verdicts(tmp_path):
    assets = end_to_end_assets()
    text = run_config_text(assets, tmp_path / "flower-live").replace("num_clients: 3", "num_clients: 2")
    config_path = tmp_path / "live.yaml"
    config_path.write_text(text + "threads: 1\nlive: {on_flower: true, min_interactions: 2}\n")
    examples = load_jsonl(assets.dataset)
    services, processes = [], Processes(tmp_path)
    try:
        with single_thread():
            for device in range(2):
                config = load_config(config_path, [f"live.store={tmp_path / f'device{device}.sqlite'}"])
                services.append(ServiceThread(build_service(config, max_batch=8)))
                tally = simulate_people(f"http://{services[-1].address}", deal(examples[6 * device : 6 * device + 6], 2, 6, device),
                                        make_oracle("none", 1, False), 1)
                assert tally.asked == 6 and tally.errors == []
            superlink = free_port()
            start_superlink(processes, superlink)
            for client, service in enumerate(services):
                start_supernode(processes, superlink, f"partition-id={client} num-partitions=2 service='{service.address}'", client)
            run_app(processes, tmp_path / "flwr-cli", "spearfl-live", superlink, config_path)
        history = read_history(tmp_path / "flower-live")
        final = load_tensors(tmp_path / "flower-live" / "adapters" / "round_0002.safetensors")
        for client, service in enumerate(services):
            first = next(row for row in history[1]["clients"] if row["client"] == client)
            consumed = {interaction.consumed_round for interaction in service.service.store.recent()}
            assert first["metrics"]["pending"] == 6 and consumed == ({1} if first["weight"] > 0 else {None})
            assert service.service.engine.adapter_version == 2
            serving = service.service.engine.adapter_state()
            assert all(torch.equal(serving[name], final[name]) for name in final)
        assert sum(row["weight"] for row in history[1]["clients"]) > 0
    finally:
        for service in services:
            service.stop()
        leftover = processes.stop()
    assert leftover == [], f"processes still running: {leftover}"
