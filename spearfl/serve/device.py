"""Putting a device service together from a run config: the model with LoRA, the answering engine, the store."""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from pathlib import Path

from spearfl.config import RunConfig
from spearfl.data import DATASETS
from spearfl.data.store import InteractionStore
from spearfl.errors import UserError
from spearfl.io import load_tensors
from spearfl.lm.generation import SamplingSettings
from spearfl.lm.models import set_adapter_state
from spearfl.runtime.setup import build_context
from spearfl.serve.app import create_app
from spearfl.serve.engine import AnswerEngine
from spearfl.serve.limits import Limits
from spearfl.serve.personal import personal_path
from spearfl.serve.rounds import DeviceRounds
from spearfl.serve.service import LOOPBACK_NAMES, AnsweredOrders, Service

PEOPLE_TOKEN_VARIABLE = "SPEARFL_PEOPLE_TOKEN"  # the people's: the page, asking, their interactions
SERVER_TOKEN_VARIABLE = "SPEARFL_SERVER_TOKEN"  # the federation server's: work orders and round notices


def store_path(config: RunConfig) -> Path:
    """The device's interaction store: live.store, or interactions.sqlite in the run's output folder."""
    return Path(config.live.store) if config.live.store else Path(config.output_dir) / "interactions.sqlite"


def label_style(config: RunConfig) -> str:
    """How a person's options are labelled: as configured, else as the configured dataset (the first task's) labels
    its own."""
    if config.data.label_style:
        return config.data.label_style
    if config.data.tasks and config.data.tasks[0].label_style:
        return config.data.tasks[0].label_style
    spec = DATASETS.get(config.data.datasets[0])
    return spec.label_style if spec is not None else "letters"


def access_token(host: str, token: str | None, variable: str, option: str) -> str | None:
    """A token the service requires: the one given, else $`variable`; listening beyond loopback needs one."""
    token = token or os.environ.get(variable) or None
    if token is None and not is_loopback(host):
        raise UserError(f"listening on {host} needs an access token: pass {option} or set {variable}")
    return token


def access_tokens(host: str, people: str | None, server: str | None) -> tuple[str | None, str | None]:
    """(the people's token, the server's token) of `spearfl serve`; beyond loopback both, and they must differ."""
    people = access_token(host, people, PEOPLE_TOKEN_VARIABLE, "--token")
    server = access_token(host, server, SERVER_TOKEN_VARIABLE, "--server-token")
    if people is not None and people == server:
        raise UserError("the people's token and the server's token must differ: each reaches only its own routes")
    return people, server


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The Host names the service answers to: the loopback names, the address it listens on, and `extra`."""
    return LOOPBACK_NAMES | {name.strip("[]").lower() for name in (host, *extra)}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_service(
    config: RunConfig, token: str | None = None, adapter: Path | None = None, adapter_version: int = 0,
    limits: Limits | None = None, max_batch: int = 16, context=None, server_token: str | None = None,
    hosts: frozenset[str] = LOOPBACK_NAMES,
) -> Service:
    """The base model with the configured LoRA (and `adapter`'s weights, if given), its engine and its store;
    `token` the people's, `server_token` the federation server's, `hosts` the Host names it answers to."""
    context = context or build_context(config)
    if adapter is not None:
        set_adapter_state(context.model, load_tensors(adapter))
    generation = config.generation
    settings = SamplingSettings(
        generation.max_new_tokens, generation.temperature, generation.top_p, max_batch, text_prefix=context.prompts.prefix
    )
    engine = AnswerEngine(context.model, context.prompts.tokenizer, settings, adapter_version, max_batch=max_batch)
    store = InteractionStore(store_path(config))
    if config.live.retention_days is not None:
        store.drop_older_than(config.live.retention_days * 86_400)
    return Service(
        engine=engine, store=store, prompts=context.prompts, label_style=label_style(config),
        model_name=config.model.name, token=token, limits=limits or Limits(), rounds=DeviceRounds(
            context, store, engine, ledger_path=store_path(config).with_suffix(".privacy.json"), personal_path=personal_path(store_path(config)),
        ),
        server_token=server_token, allowed_hosts=hosts, orders=AnsweredOrders(store_path(config).with_suffix(".orders.json")),
    )


class ServiceThread:
    """A service listening on 127.0.0.1 (port 0: a free one) in a thread of this process, for demos, benchmarks and tests;
    `tls`: (certificate file, key file) to serve https; `stop` ends the server, the engine and the store."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0, startup_seconds: float = 30.0,
                 tls: tuple[str, str] | None = None):
        import uvicorn

        self.service = service
        certificate, key = tls or (None, None)
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", ws="none",
                                                    ssl_certfile=certificate, ssl_keyfile=key))
        self.thread = threading.Thread(target=self.server.run, name="spearfl-service", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_seconds
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        self.address = f"{host}:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.engine.close()
        self.service.store.close()
