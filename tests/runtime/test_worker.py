"""The client worker's HTTP front: a thread per connection, so a sender that stalls mid-request is dropped after the
socket timeout while others are answered; one work order at a time, another arriving meanwhile refused with 503; a body is read whole before the work order takes
the worker, within a deadline."""

import json
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest

import spearfl.runtime.worker as worker
from spearfl.runtime.worker import WorkerError, make_server, train_on_worker


class HeldHost:
    """A ClientHost whose rounds wait for `release`; counts the rounds it ran."""

    models_loaded = 1

    def __init__(self):
        self.started, self.release, self.rounds = threading.Event(), threading.Event(), 0

    def train_arrays(self, arrays, request, device=None):
        self.started.set()
        self.release.wait(timeout=30)
        self.rounds += 1
        return arrays, {"weight": 1.0, "metrics": {}, "nonce": request["nonce"]}


@pytest.fixture
def served():
    host = HeldHost()
    server = make_server("127.0.0.1", 0, host)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield host, server.server_address[1]
    host.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return json.load(response)


def stall(port: int) -> socket.socket:
    """A connection that sends half a work order, then nothing."""
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    stalled.sendall(b"POST /train HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\npartial")
    return stalled


def test_a_stalled_sender_holds_only_its_own_thread_and_is_dropped_after_the_socket_timeout(served, monkeypatch):
    host, port = served
    assert worker.WorkerHandler.timeout == worker.SOCKET_TIMEOUT_SECONDS  # every connection has one
    with stall(port):
        assert health(port)["status"] == "ok"  # answered meanwhile, on another thread
    monkeypatch.setattr(worker.WorkerHandler, "timeout", 0.5)  # for the connections made from now on
    with stall(port) as stalled:
        started = time.monotonic()
        assert stalled.recv(1024) == b"" and time.monotonic() - started < 5  # the worker hung up on it
    assert host.rounds == 0


def test_one_work_order_at_a_time_and_another_meanwhile_gets_503(served):
    host, port = served
    address, arrays, request = f"127.0.0.1:{port}", {"x": np.ones(3, np.float32)}, {"nonce": "n1", "round_index": 1}
    first = {}
    thread = threading.Thread(target=lambda: first.update(result=train_on_worker(address, arrays, request)))
    thread.start()
    assert host.started.wait(timeout=10)
    with pytest.raises(WorkerError, match=r"\(503\).*running another work order"):
        worker.exchange(address, "/train", arrays, {"request": request | {"nonce": "n2"}}, timeout=10)
    assert health(port)["status"] == "ok"
    host.release.set()
    thread.join(timeout=30)
    assert first["result"][1]["nonce"] == "n1" and host.rounds == 1


def test_a_stalled_sender_does_not_hold_the_work_order_slot(served):
    host, port = served
    host.release.set()
    with stall(port):  # stalled mid-body, under the full socket timeout
        state, result = train_on_worker(f"127.0.0.1:{port}", {"x": np.ones(3, np.float32)}, {"nonce": "n1", "round_index": 1})
    assert result["nonce"] == "n1" and host.rounds == 1


def test_a_sender_slower_than_its_deadline_is_dropped(served, monkeypatch):
    host, port = served
    monkeypatch.setattr(worker, "SOCKET_TIMEOUT_SECONDS", 0.2)  # the deadline: 0.2 s + 1000 bytes at 256 kB/s
    with stall(port) as stalled:
        started = time.monotonic()
        while time.monotonic() - started < 5:  # a byte at a time, each well within the socket timeout
            try:
                stalled.sendall(b"x")
            except OSError:
                break
            time.sleep(0.05)
        stalled.settimeout(5)
        assert stalled.recv(1024) == b"" and time.monotonic() - started < 5
    assert host.rounds == 0
