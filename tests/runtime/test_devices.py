"""The server's side of live rounds: every device in a round hears its outcome with the nonce of its own work order
(the device settles nothing without it); a device not in the round hears no nonce; a device's address may be https."""

import numpy as np
import torch
from helpers import make_config

import spearfl.runtime.devices as devices
from spearfl.algorithms.base import REPORTED_METRICS
from spearfl.runtime.worker import WorkerError


def test_each_device_in_the_round_hears_its_outcome_with_its_own_work_orders_nonce(monkeypatch):
    config = make_config("data.num_clients=3", "server.clients_per_round=2", 'live.devices=["a:1", "https://b:2", "c:3"]')
    runner = devices.DeviceClients(type("Context", (), {"config": config})(), None, None)
    global_state = {"x.lora_A.weight": torch.zeros(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}
    trained = {"x.lora_A.weight": np.ones((2, 3), np.float32), "x.lora_B.weight": np.ones((3, 2), np.float32)}
    sent = []

    def exchange(address, path, arrays, header, token=None, timeout=None):
        sent.append((address, path, header))
        if path == "/worker/train" and address == "https://b:2":
            raise WorkerError("b is down")
        if path == "/worker/train":
            return trained, {"weight": 2.0, "metrics": dict.fromkeys(REPORTED_METRICS, 4), "nonce": header["request"]["nonce"]}
        return {}, {"round": header["round"]}

    monkeypatch.setattr(devices, "exchange", exchange)
    replies = runner.train(1, [0, 1], global_state, 0.01)
    assert [client for client, _ in replies.results] == [0] and replies.rejected[0]["client"] == 1
    orders = {address: header["request"]["nonce"] for address, path, header in sent if path == "/worker/train"}
    runner.settle(1, replies, global_state)
    notices = {address: header for address, path, header in sent if path == "/worker/result"}
    plain = {"version": 1, "ends_federation": False}
    assert notices["a:1"] == {"round": 1, "accepted": True, "nonce": orders["a:1"]} | plain
    assert notices["https://b:2"] == {"round": 1, "accepted": False, "nonce": orders["https://b:2"]} | plain
    assert notices["c:3"] == {"round": 1, "accepted": None} | plain
    assert len(set(orders.values())) == 2
    # the round that ends a federation stage says so to every device, which then trains after federation
    assert runner.after_federation(1, global_state) == []
    sent.clear()
    runner.settle(1, replies, global_state)
    assert all(header["ends_federation"] for _, path, header in sent if path == "/worker/result")
