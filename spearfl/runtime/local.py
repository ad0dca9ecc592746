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
from spearfl.algorithms.base import ClientContext, ClientRound
from spearfl.config import ConfigError, RunConfig
from spearfl.runtime.client import run_client, upload
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
    """Runs each chosen client's update in this process, on the shared model."""

    def __init__(self, context: ClientContext, federation: Federation, progress: Progress | None):
        self.context = context
        self.federation = federation
        self.progress = progress
        self.update = ALGORITHMS[context.config.algorithm]

    def choose(self, round_index: int) -> list[int]:
        return choose_clients(self.context.config, round_index)

    def train(self, round_index: int, clients: list[int], global_state, lr: float) -> RoundReplies:
        bar = self.progress.add_task(f"round {round_index} clients", total=len(clients)) if self.progress else None
        results, missing = [], missing_clients(self.context.config, round_index, clients)
        for client in clients:
            if client in missing:
                continue
            work = ClientRound(client, round_index, self.federation.clients[client], global_state, lr, self.context.config.seed)
            result = run_client(self.update, self.context, work)
            encoding = self.context.config.server.upload_encoding
            results.append((client, as_received(result, upload(result, global_state, encoding), global_state, encoding)))
            if bar is not None:
                self.progress.advance(bar)
        if bar is not None:
            self.progress.remove_task(bar)
        return RoundReplies(results, [{"client": client, "reason": reason} for client, reason in missing.items()])

    def settle(self, round_index: int, replies: RoundReplies, global_state) -> None:
        """Nothing to tell: the clients live in this process and hold nothing between rounds."""


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
