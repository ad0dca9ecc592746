"""Malformed payloads never get through: property-based tests of the reply check and the payload parser, and a
corpus of hostile payloads against the client worker's HTTP endpoint."""

import http.client
import json
import math
import pickle
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays as numpy_arrays

from spearfl.federated.codec import InvalidReply, check_reply, layout_of
from spearfl.runtime.worker import make_server, pack, unpack

EXPECTED = layout_of({"a.lora_A.weight": np.zeros((2, 3), np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)})
METRICS = ("prompts", "seconds")
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.uint16])
shapes = st.sampled_from([(2, 3), (3, 2), (3, 3), (2,), (6,), (0, 3)])
one_array = st.builds(lambda d, s: (d, s), dtypes, shapes).flatmap(
    lambda pair: numpy_arrays(pair[0], pair[1], elements=None if pair[0] not in (np.float32,) else st.floats(width=32))
)
payloads = st.dictionaries(st.sampled_from(["a.lora_A.weight", "a.lora_B.weight", "other"]), one_array, max_size=3)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 100), st.booleans(), st.none(), st.text(max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, numbers, st.dictionaries(st.sampled_from(METRICS + ("extra",)), numbers, max_size=3))
def test_a_reply_is_accepted_only_when_everything_about_it_holds(arrays, weight, metrics):
    try:
        accepted, checked_weight = check_reply(arrays, weight, metrics, EXPECTED, METRICS)
    except InvalidReply:
        return
    assert math.isfinite(checked_weight) and 0 <= checked_weight <= metrics["prompts"]
    assert all(isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]) for key in METRICS)
    if checked_weight == 0:
        assert accepted is None
        return
    assert accepted.keys() == EXPECTED.keys()
    for name, (shape, dtype) in EXPECTED.items():
        assert accepted[name].shape == shape and str(accepted[name].dtype) == dtype and np.isfinite(accepted[name]).all()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_the_payload_parser_names_a_fault_or_returns_a_header_object(data):
    try:
        arrays, header = unpack(data)
    except ValueError as error:
        assert str(error)
        return
    assert isinstance(header, dict) and all(isinstance(a, np.ndarray) for a in arrays.values())


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), numpy_arrays(np.float32, (2, 2)), max_size=3),
       st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
def test_pack_and_unpack_round_trip(arrays, header):
    unpacked, read = unpack(pack(arrays, header))
    assert read == header and unpacked.keys() == arrays.keys()
    assert all(np.array_equal(unpacked[k], arrays[k], equal_nan=True) for k in arrays)


def hostile_payloads() -> dict[str, bytes]:
    good = pack({"w": np.zeros(2, np.float32)}, {"request": {"client_id": 0}})
    size = int.from_bytes(good[:8], "little")
    return {
        "empty": b"",
        "pickle": pickle.dumps({"request": {"client_id": 0}}),
        "truncated": good[: len(good) // 2],
        "header size beyond the payload": (10**12).to_bytes(8, "little") + good[8:],
        "header not JSON": size.to_bytes(8, "little") + b"\xff" * size + good[8 + size :],
        "offsets out of range": (lambda h: len(h).to_bytes(8, "little") + h)(
            json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]},
                        "__metadata__": {"spearfl": json.dumps({"request": {}})}}).encode()),
        "no spearfl header": (lambda h: len(h).to_bytes(8, "little") + h)(json.dumps({"__metadata__": {}}).encode()),
        "deeply nested header": (lambda h: len(h).to_bytes(8, "little") + h)(
            json.dumps({"__metadata__": {"spearfl": "[" * 40_000 + "]" * 40_000}}).encode()),
        "huge JSON metadata": pack({}, {"request": {"x": "y" * 300_000}}),
        "request not an object": pack({}, {"request": [1, 2, 3]}),
        "no request": pack({}, {"other": 1}),
        "request with unknown fields": pack({"w": np.zeros(2, np.float32)}, {"request": {"nonsense": 1}}),
    }


class RefusingHost:
    """Stands in for ClientHost: refuses work orders it cannot run, as ClientHost does; counts the ones it ran."""

    def __init__(self):
        self.ran = 0

    def train_arrays(self, arrays, request, device=None):
        from spearfl.runtime.client import TrainRequest

        TrainRequest(**request)  # TypeError on unknown or missing fields
        self.ran += 1
        return arrays, {"weight": 0.0, "metrics": {}}


@pytest.fixture
def worker():
    host = RefusingHost()
    server = make_server("127.0.0.1", 0, host, token="sesame", max_body_bytes=200_000)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, host
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def post(server, body: bytes, token: str | None = "sesame") -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connection.request("POST", "/train", body=body, headers=headers)
    response = connection.getresponse()
    status, text = response.status, response.read()
    connection.close()
    return status, json.loads(text)


@pytest.mark.parametrize("name", sorted(hostile_payloads()))
def test_the_client_worker_refuses_every_hostile_payload_and_keeps_serving(worker, name):
    server, host = worker
    status, body = post(server, hostile_payloads()[name])
    expected = 413 if name == "huge JSON metadata" else 400
    assert status == expected and body["error"], (name, status, body)
    assert host.ran == 0
    assert post(server, b"", token=None)[0] == 401  # no token: refused before anything is read
    assert post(server, b"", token="wrong")[0] == 401
