"""What the service's tests share: a service on a tiny random model, a client that reaches it by a loopback name,
a stand-in for the device's rounds, and a certificate authority made in the test."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from fastapi.testclient import TestClient
from helpers import make_config, make_context, tiny_lora_model

from spearfl.data.store import InteractionStore
from spearfl.lm.generation import SamplingSettings
from spearfl.serve.app import create_app
from spearfl.serve.engine import AnswerEngine
from spearfl.serve.limits import Limits
from spearfl.serve.service import Service


def make_service(tokenizer, tmp_path, token=None, limits=None, max_new_tokens=6, batch_window=0.02, *overrides, **fields):
    """A service on a tiny random model with LoRA; `fields` set the Service's others (server_token, rounds, ...)."""
    model = tiny_lora_model(tokenizer)
    context = make_context(model, tokenizer, make_config(*overrides))
    settings = SamplingSettings(max_new_tokens, 1.0, 1.0, 8, text_prefix=context.prompts.prefix)
    engine = AnswerEngine(model, tokenizer, settings, adapter_version=0, max_batch=8, batch_window=batch_window)
    store = InteractionStore(tmp_path / "interactions.sqlite")
    return Service(engine, store, context.prompts, "text", "tiny", token=token, limits=limits or Limits(), **fields)


def local_client(service: Service, **settings) -> TestClient:
    """A test client that names the service as a browser on the device would (Host: 127.0.0.1)."""
    return TestClient(create_app(service), base_url="http://127.0.0.1", **settings)


class RecordedRounds:
    """Stands in for DeviceRounds: answers every work order with weight 0 and records the notices it settles,
    installing their adapters as DeviceRounds does."""

    def __init__(self, engine: AnswerEngine):
        self.engine, self.orders, self.settled = engine, [], []

    def train_arrays(self, arrays, header):
        self.orders.append(header)
        return {}, {"weight": 0.0, "metrics": {}, "nonce": header["request"]["nonce"]}

    def settle(self, round_index, accepted, state=None, version=None, ends_federation=False):
        self.settled.append((round_index, accepted, version) + ((True,) if ends_federation else ()))
        if state is not None:
            self.engine.install(state, version).result()
        return 0

    def personal_view(self):
        return {"method": "none", "answering": "global", "global_version": self.engine.adapter_version, "personal": None, "reset_at": None}

    def reset_personal(self):
        pass


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key), PEM files: a CA made here signs a certificate for
    127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, signer, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("spearfl test CA", ca_key, "spearfl test CA", ca_key, [(x509.BasicConstraints(ca=True, path_length=0), True)])
    names = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    server = certificate("127.0.0.1", server_key, "spearfl test CA", ca_key, [(names, False), (x509.BasicConstraints(ca=False, path_length=None), True)])
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths
