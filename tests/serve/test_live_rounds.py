"""The live loop end to end on loopback: two device services, simulated people asking and judging through the HTTP API,
and the server loop running rounds on the devices (`live.devices`): the rounds train on exactly the judged
interactions, consume them once, and every device then answers with the new global adapter."""

import time

import httpx
import pytest
import torch
from helpers import end_to_end_assets, read_history, single_thread, write_run_config

from spearfl.config import load_config
from spearfl.data.sources import load_jsonl
from spearfl.feedback.providers import make_oracle
from spearfl.io import load_tensors
from spearfl.runtime.local import run_local
from spearfl.serve.device import ServiceThread, build_service
from spearfl.serve.simulate import deal, simulate_people


def stream_done(client: httpx.Client, path: str, body) -> dict:
    import json

    with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return json.loads(lines[-1][len("data: "):])


@pytest.fixture
def devices(tmp_path):
    assets = end_to_end_assets()
    config_path = write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run")
    running = []
    with single_thread():
        for device in range(2):
            # a device's live settings are its own: no work order sets how many interactions a round needs
            device_config = load_config(config_path, [f"live.store={tmp_path / f'device{device}.sqlite'}", "live.min_interactions=2"])
            running.append(ServiceThread(build_service(device_config, max_batch=8)))
        yield assets, config_path, running
    for service in running:
        service.stop()


def test_rounds_train_on_the_judged_interactions_once_and_devices_answer_with_the_new_adapter(devices, tmp_path):
    assets, config_path, running = devices
    examples = load_jsonl(assets.dataset)
    oracle = make_oracle("none", 1, False)
    for index, device in enumerate(running):  # three people a device, two questions each, asking at once
        tally = simulate_people(f"http://{device.address}", deal(examples[6 * index : 6 * index + 6], 3, 6, seed=index), oracle, 1)
        assert tally.asked == 6 and tally.errors == [] and len(tally.total_seconds) == 6 + tally.revisions
        stored = device.service.store.recent()
        assert len(stored) == 6 and all(i.attempts[-1].verdict is not None for i in stored)
        assert sum(i.first.verdict for i in stored) == tally.first_right
        assert sum(len(i.attempts) - 1 for i in stored) == tally.revisions
    asked = [[interaction.id for interaction in device.service.store.recent()] for device in running]
    addresses = ", ".join(f'"{device.address}"' for device in running)
    config = load_config(config_path, [
        "data.num_clients=2", "server.clients_per_round=2", "server.rounds=2", f"live.devices=[{addresses}]",
        "live.min_interactions=2", "eval.methods=[loglik]",
    ])
    with single_thread():
        run_local(config, show_progress=False)

    history = read_history(tmp_path / "run")
    first, second = history[1]["clients"], history[2]["clients"]
    assert sorted(client["client"] for client in first) == [0, 1] and "rejected" not in history[1]
    final = load_tensors(tmp_path / "run" / "adapters" / "round_0002.safetensors")
    for client, device in enumerate(running):
        stored = device.service.store.get_many(asked[client])
        trained = next(row for row in first if row["client"] == client)
        assert trained["metrics"]["pending"] == 6 and trained["metrics"]["generations"] == 0
        # consumed by round 1 exactly when the round trained on them; round 2 found nothing new and weighs 0
        assert {interaction.consumed_round for interaction in stored} == ({1} if trained["weight"] > 0 else {None})
        again = next(row for row in second if row["client"] == client)
        assert again["weight"] == 0 and again["metrics"]["pending"] == (0 if trained["weight"] > 0 else 6)
        with httpx.Client(base_url=f"http://{device.address}", timeout=60) as client_http:
            assert client_http.get("/health").json()["adapter_version"] == 2
            answer = stream_done(client_http, "/ask", {"question": examples[0].question, "options": list(examples[0].options)})
        assert answer["adapter_version"] == 2
        serving = device.service.engine.adapter_state()
        assert all(torch.equal(serving[name], final[name]) for name in final)
    assert sum(row["weight"] for row in first) > 0, "no device had a judged win to learn from"


def test_with_a_period_a_round_waits_for_ready_devices_and_draws_from_them(monkeypatch):
    from helpers import make_config

    from spearfl.runtime.devices import DeviceClients

    def runner_with(period, counts):
        config = make_config(
            "data.num_clients=4", "server.clients_per_round=2", 'live.devices=["a:1", "b:2", "c:3", "d:4"]',
            "live.min_interactions=3", f"live.round_period_seconds={period}",
        )
        runner = DeviceClients(type("Context", (), {"config": config})(), None, None)
        polls = iter(counts)
        monkeypatch.setattr(runner, "pending_counts", lambda: next(polls))
        return runner, polls

    monkeypatch.setattr("spearfl.runtime.devices.POLL_SECONDS", 0.01)
    runner, polls = runner_with(30, [[0, 5, 0, 1], [0, 5, 0, 2], [4, 5, 0, 3], [9, 9, 9, 9]])
    chosen = runner.choose(1)  # the second ready device comes on the third poll
    assert len(chosen) == 2 and set(chosen) <= {0, 1, 3} and next(polls) == [9, 9, 9, 9]
    runner, _ = runner_with(0.05, iter(lambda: [0, 5, 0, 1], None))  # never two ready: the period runs out
    started = time.monotonic()
    chosen = runner.choose(1)
    assert 1 in chosen and len(chosen) == 2 and time.monotonic() - started >= 0.05


def test_a_device_reply_that_fails_the_checks_is_dropped_with_its_reason(monkeypatch):
    import numpy as np
    from helpers import make_config

    import spearfl.runtime.devices as devices
    from spearfl.algorithms.base import REPORTED_METRICS

    config = make_config("data.num_clients=2", "server.clients_per_round=2", 'live.devices=["a:1", "b:2"]')
    runner = devices.DeviceClients(type("Context", (), {"config": config})(), None, None)
    global_state = {"x.lora_A.weight": torch.zeros(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}
    metrics = dict.fromkeys(REPORTED_METRICS, 4)
    replies = {
        "a:1": ({"x.lora_A.weight": np.full((2, 3), np.nan, np.float32), "x.lora_B.weight": np.ones((3, 2), np.float32)},
                {"weight": 2.0, "metrics": metrics}),
        "b:2": ({"x.lora_A.weight": np.ones((2, 3), np.float32), "x.lora_B.weight": np.ones((3, 2), np.float32)},
                {"weight": 2.0, "metrics": metrics}),
    }
    sent = []

    def exchange(address, path, arrays, header, token=None, timeout=None):
        sent.append(header["request"]["nonce"])
        payload, result = replies[address]
        return payload, result | {"nonce": sent[0]}  # the second device echoes the first one's nonce

    monkeypatch.setattr(devices, "exchange", exchange)
    result = runner.train(1, [0, 1], global_state, 0.01)
    assert result.rejected[0] == {"client": 0, "reason": "x.lora_A.weight: 6 values are not finite"}
    assert result.rejected[1]["client"] == 1 and "replayed or forged" in result.rejected[1]["reason"]
    sent.clear()  # now every device echoes its own work order's nonce
    monkeypatch.setattr(devices, "exchange", lambda address, path, arrays, header, token=None, timeout=None: (
        replies[address][0], replies[address][1] | {"nonce": header["request"]["nonce"]}))
    result = runner.train(2, [1], global_state, 0.01)
    assert [client for client, _ in result.results] == [1] and result.results[0][1].weight == 2.0
