"""Federated simulation on one machine: one base model, many clients taking turns, the server in-process; or,
with `live.devices`, the same server loop driving device services that learn from their people.

The clients run one after another on the server's own model (only the LoRA weights are swapped), through
the same client update and the same server loop (`spearfl.runtime.server`) that a Flower deployment uses.
"""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

from rich.progress import Progress

from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientContext
from spearfl.config import ConfigError, RunConfig
from spearfl.personal import METHODS, PersonalClient
from spearfl.runtime.client import run_personal_client, upload
from spearfl.runtime.devices import DeviceClients
from spearfl.runtime.server import (
    FederatedRun,
    RoundReplies,
    as_received,
    choose_clients,
)
from spearfl.runtime.setup import Federation
from spearfl.seeds import SERVER_CLIENT_ID, derive_seed, numpy_generator


class InProcessClients:
    """Runs each chosen client's update in this process, on the shared model; keeps each client's personal adapter
    (spearfl.personal), which the server checkpoints with the round (`personal_states`, `restore_personal`)."""

    def __init__(self, context: ClientContext, federation: Federation, progress: Progress | None):
        self.context = context
        self.federation = federation
        self.progress = progress
        self.update = ALGORITHMS[context.config.algorithm]
        self.method = METHODS[context.config.personal.method](context.config.personal)
        validation = federation.client_validation or [[] for _ in federation.clients]
        self.clients = [PersonalClient(client, examples, own) for client, (examples, own) in enumerate(zip(federation.clients, validation))]

    def choose(self, round_index: int) -> list[int]:
        return choose_clients(self.context.config, round_index)

    def train(self, round_index: int, clients: list[int], global_state, lr: float) -> RoundReplies:
        bar = self.progress.add_task(f"round {round_index} clients", total=len(clients)) if self.progress else None
        results, missing = [], missing_clients(self.context.config, round_index, clients)
        for client in clients:
            if client in missing:
                continue
            own = self.clients[client]
            result, own.personal, notes = run_personal_client(self.method, self.update, self.context, own, round_index, global_state, lr)
            encoding = self.context.config.server.upload_encoding
            received = as_received(result, upload(result, global_state, encoding), global_state, encoding)
            if notes:
                received.metrics |= {"personal": notes}  # the simulation's record: a device keeps these to itself
            results.append((client, received))
            if bar is not None:
                self.progress.advance(bar)
        if bar is not None:
            self.progress.remove_task(bar)
        return RoundReplies(results, [{"client": client, "reason": reason} for client, reason in missing.items()])

    def settle(self, round_index: int, replies: RoundReplies, global_state) -> None:
        """Nothing to tell: the clients live in this process."""

    def after_federation(self, round_index: int, global_state) -> list[dict]:
        """Every client's training after federation (`personal.method`'s); the metrics of each that trained."""
        rows = []
        for client in self.clients:
            personal, metrics = self.method.after_federation(self.context, client, global_state, round_index)
            if metrics:
                rows.append({"client": client.client_id, "metrics": metrics})
            client.personal = personal
        return rows

    def personal_adapters(self, global_state) -> dict[int, dict] | None:
        """Each client's personal adapter as it would answer (the global one where it has none yet); None when the
        method keeps none."""
        if not self.method.keeps_personal:
            return None
        return {client.client_id: self.method.personal_of(client, global_state) for client in self.clients}

    def personal_states(self) -> dict[int, dict]:
        """The personal adapters the clients hold, for the checkpoint."""
        return {client.client_id: client.personal for client in self.clients if client.personal is not None}

    def restore_personal(self, states: dict[int, dict]) -> None:
        for client in self.clients:
            client.personal = states.get(client.client_id)


def missing_clients(config: RunConfig, round_index: int, clients: list[int]) -> dict[int, str]:
    """Simulated faults: which of the round's clients never answer or answer too late, and why (seeded per round)."""
    settings = config.server
    order = numpy_generator(derive_seed(config.seed, round_index, SERVER_CLIENT_ID, "faults")).permutation(clients).tolist()
    num_dropped = round(settings.simulated_dropout * len(clients))
    num_late = round(settings.simulated_stragglers * len(clients))
    missing = {client: "dropped out: no reply (simulated)" for client in order[:num_dropped]}
    missing |= {client: "no reply before the round's deadline (simulated straggler)" for client in order[num_dropped : num_dropped + num_late]}
    return missing


def stop_on_terminate(signal_number, frame) -> None:
    """SIGTERM ends a run like Ctrl-C does, so its folder is marked interrupted."""
    raise KeyboardInterrupt(f"signal {signal_number}")


def run_local(config: RunConfig, fresh: bool = False, show_progress: bool = True, context=None, base_evals=None) -> dict:
    """Run or resume the configured experiment; `fresh` deletes an existing folder first. `base_evals`: see
    `FederatedRun`."""
    if config.server.secure_aggregation != "none":
        raise ConfigError(
            f"server.secure_aggregation {config.server.secure_aggregation} needs the Flower runtime (flwr run, docs/security.md): "
            "here the server runs every client in its own process and holds each update anyway, so masking them hides nothing"
        )
    if fresh and Path(config.output_dir).exists():
        shutil.rmtree(config.output_dir)
    runner = DeviceClients if config.live.devices else InProcessClients  # people's devices, or simulated clients
    run = FederatedRun(config, runner, context=context, show_progress=show_progress, base_evals=base_evals)
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return run.run()
    previous = signal.signal(signal.SIGTERM, stop_on_terminate)
    try:
        return run.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
