"""TLS between the server and the devices, on loopback with a CA made in the test: a device service and a client
worker serve https; the server side speaks https to an `https://host:port` address and verifies the certificate
against $SPEARFL_TLS_CA; without that CA, or over plain http, the exchange is refused."""

import threading

import numpy as np
import pytest
from helpers import single_thread
from serving import RecordedRounds, make_certificates, make_service
from typer.testing import CliRunner

from spearfl.cli import app
from spearfl.data.store import Attempt
from spearfl.runtime.devices import device_pending
from spearfl.runtime.worker import WorkerError, exchange, make_server, train_on_worker
from spearfl.serve.device import ServiceThread


class EchoHost:
    models_loaded = 0

    def train_arrays(self, arrays, request, device=None):
        return {name: array + 1 for name, array in arrays.items()}, {"weight": 1.0, "metrics": {}, "nonce": request["nonce"]}


@pytest.fixture
def certificates(tmp_path):
    return make_certificates(tmp_path)


def test_a_device_service_over_tls_takes_a_notice_and_reports_pending_and_refuses_without_the_ca(tokenizer, tmp_path, certificates, monkeypatch):
    authority, certificate, key = certificates
    with single_thread():
        service = make_service(tokenizer, tmp_path)
        service.rounds = RecordedRounds(service.engine)
        served = ServiceThread(service, tls=(str(certificate), str(key)))
        try:
            address = f"https://{served.address}"
            arrays = {name: tensor.numpy() + np.float32(0.01) for name, tensor in service.engine.adapter_state().items()}
            monkeypatch.delenv("SPEARFL_TLS_CA", raising=False)  # the system's CAs do not know this one
            with pytest.raises(WorkerError, match="TLS failed.*CERTIFICATE_VERIFY_FAILED"):
                exchange(address, "/worker/result", arrays, {"round": 1, "accepted": None, "version": 1}, timeout=30)
            with pytest.raises(WorkerError):
                exchange(served.address, "/worker/result", arrays, {"round": 1, "accepted": None, "version": 1}, timeout=30)
            assert device_pending(address, None) == 0 and service.engine.adapter_version == 0 and service.rounds.settled == []
            monkeypatch.setenv("SPEARFL_TLS_CA", str(authority))
            _, reply = exchange(address, "/worker/result", arrays, {"round": 1, "accepted": None, "version": 1}, timeout=30)
            assert reply["adapter_version"] == 1 and service.rounds.settled == [(1, None, 1)]
            service.store.judge(service.store.add("Which is red?", Attempt([1], "Answer: A", [2], 0)), 0, True)
            assert device_pending(address, None) == 1
        finally:
            served.stop()


def test_a_client_worker_over_tls_answers_a_work_order_and_refuses_a_client_without_the_ca(certificates, monkeypatch):
    authority, certificate, key = certificates
    server = make_server("127.0.0.1", 0, EchoHost(), tls=(str(certificate), str(key)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address, arrays = f"https://127.0.0.1:{server.server_address[1]}", {"x": np.zeros(3, np.float32)}
        monkeypatch.setenv("SPEARFL_TLS_CA", str(authority))
        state, result = train_on_worker(address, arrays, {"nonce": "n1"})
        assert np.array_equal(state["x"], np.ones(3, np.float32)) and result["nonce"] == "n1"
        monkeypatch.delenv("SPEARFL_TLS_CA")
        with pytest.raises(WorkerError, match="TLS failed"):
            train_on_worker(address, arrays, {"nonce": "n2"})
        monkeypatch.setenv("SPEARFL_TLS_CA", str(certificate.parent / "missing.pem"))
        with pytest.raises(WorkerError, match="not a readable CA file"):
            train_on_worker(address, arrays, {"nonce": "n3"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_tls_needs_both_the_certificate_and_its_key(certificates):
    _, certificate, _ = certificates
    for command in (["serve", "--tls-cert", str(certificate)], ["client-worker", "--tls-cert", str(certificate)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in " ".join(result.output.split())
