"""What the federation's routes take from outside: an adapter (a work order's, a round notice's) must have the layout of
the adapter answering and finite values, as a client's reply must; a notice must bring a newer version than the one
answering, and for a round this device answered, the nonce of that work order, which the device keeps on disk."""

import os

import numpy as np
import pytest
import torch
from helpers import single_thread
from serving import RecordedRounds, local_client, make_service

from spearfl.runtime.worker import pack
from spearfl.serve.service import AnsweredOrders

OCTETS = {"Content-Type": "application/octet-stream"}


@pytest.fixture
def device(tokenizer, tmp_path):
    with single_thread():
        service = make_service(tokenizer, tmp_path, orders=AnsweredOrders(tmp_path / "interactions.orders.json"))
        service.rounds = RecordedRounds(service.engine)
        with local_client(service) as client:
            yield service, client
        service.engine.close()
        service.store.close()


def serving_arrays(service, shift: float = 0.0) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() + np.float32(shift) for name, tensor in service.engine.adapter_state().items()}


def post(client, path: str, arrays: dict, header: dict):
    return client.post(path, content=pack(arrays, header), headers=OCTETS)


def work_order(round_index: int, nonce: str) -> dict:
    return {"request": {"config": {}, "client_id": 0, "round_index": round_index, "lr": 0.01, "nonce": nonce}}


def same_adapter(state: dict[str, torch.Tensor], arrays: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(state[name].numpy(), array) for name, array in arrays.items())


def test_an_adapter_from_outside_must_pass_the_checks_a_reply_passes(device):
    service, client = device
    before, good = serving_arrays(service), serving_arrays(service, 0.01)
    name = sorted(good)[0]
    bad = {
        "values are not finite": good | {name: np.full_like(good[name], np.nan)},
        "expected float32": good | {name: good[name].astype(np.float16)},
        f"expected float32 {good[name].shape}": good | {name: good[name][:1]},
        "1 missing": {key: value for key, value in good.items() if key != name},
        "1 unexpected": good | {"extra.lora_A.weight": np.zeros((2, 2), np.float32)},
    }
    for words, arrays in bad.items():
        notice = post(client, "/worker/result", arrays, {"round": 1, "accepted": None, "version": 1})
        order = post(client, "/worker/train", arrays, work_order(1, "n1"))
        for response in (notice, order):
            assert response.status_code == 422 and words in response.text, (words, response.text)
    assert service.rounds.settled == [] and service.rounds.orders == [] and service.engine.adapter_version == 0
    assert same_adapter(service.engine.adapter_state(), before)
    assert post(client, "/worker/result", good, {"round": 1, "accepted": None, "version": 1}).status_code == 200
    assert service.engine.adapter_version == 1 and same_adapter(service.engine.adapter_state(), good)


def test_a_notice_that_brings_no_newer_adapter_is_refused(device):
    service, client = device
    first, replayed = serving_arrays(service, 0.01), serving_arrays(service, 0.02)
    assert post(client, "/worker/result", first, {"round": 2, "accepted": None, "version": 2}).status_code == 200
    for version in (2, 1):
        response = post(client, "/worker/result", replayed, {"round": version, "accepted": None, "version": version})
        assert response.status_code == 409 and "not newer than version 2" in response.text
    assert service.rounds.settled == [(2, None, 2)] and same_adapter(service.engine.adapter_state(), first)


def test_a_notice_settles_an_answered_round_only_with_its_work_orders_nonce_even_after_a_restart(device, tokenizer, tmp_path):
    service, client = device
    assert post(client, "/worker/train", serving_arrays(service), work_order(3, "nonce-of-round-3")).status_code == 200
    for header in ({"round": 3, "accepted": True}, {"round": 3, "accepted": False, "nonce": "forged"},
                   {"round": 3, "accepted": True, "nonce": 7}):
        response = post(client, "/worker/result", {}, header)
        assert response.status_code == 409 and "nonce of the work order" in response.text, header
    assert service.rounds.settled == []
    assert post(client, "/worker/result", {}, {"round": 3, "accepted": None}).status_code == 200  # not in it: nothing to settle
    assert post(client, "/worker/result", {}, {"round": 2, "accepted": False}).status_code == 200  # a round it never answered
    assert post(client, "/worker/result", {}, {"round": 3, "accepted": True, "nonce": "nonce-of-round-3"}).status_code == 200
    assert service.rounds.settled == [(3, None, None), (2, False, None), (3, True, None)]
    kept = tmp_path / "interactions.orders.json"
    assert os.stat(kept).st_mode & 0o777 == 0o600

    with single_thread():  # the device restarts: a new service on the same files
        restarted = make_service(tokenizer, tmp_path, orders=AnsweredOrders(kept))
        restarted.rounds = RecordedRounds(restarted.engine)
        with local_client(restarted) as again:
            assert post(again, "/worker/result", {}, {"round": 3, "accepted": True, "nonce": "forged"}).status_code == 409
            assert post(again, "/worker/result", {}, {"round": 3, "accepted": True, "nonce": "nonce-of-round-3"}).status_code == 200
        restarted.engine.close()
        restarted.store.close()


def test_a_malformed_notice_gets_400_and_settles_nothing(device):
    service, client = device
    for header, words in (({"accepted": True}, "round"), ({"round": "x"}, "round"),
                          ({"round": 1, "accepted": "yes"}, "accepted must be true, false or null")):
        response = post(client, "/worker/result", {}, header)
        assert response.status_code == 400 and words in response.text, (header, response.text)
    assert service.rounds.settled == []
