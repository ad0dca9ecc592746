"""The server's side of the live loop: each client is a device service (`spearfl serve`) reached over HTTP.

Client i is the device at `live.devices[i]` (`host:port`, or `https://host:port`, whose certificate is verified
against the CA file $SPEARFL_TLS_CA). A round sends each chosen device the global adapter and its work order
(`/worker/train`, the client worker's safetensors payload, with the server's token $SPEARFL_SERVER_TOKEN when
set: it reaches a device's /worker/* routes and nothing of its people's); a device that cannot be reached or
refuses is dropped from the round with its reason, like a Flower reply that fails its check. Once the round is
aggregated and checkpointed, every device hears the outcome (`/worker/result`): whether its reply was accepted
(then its interactions are consumed), with the nonce of the device's work order for the round, and the new global
adapter, which it answers with from then on. A device that misses the notice gets it with its next work order.

Left out: the outcomes a device missed are kept in the server's memory only, so a server restarted between a
round and the next notice leaves those claims open on the device (its interactions stay out of training until
the device is told; nothing is lost and nothing trained twice).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from rich.progress import Progress

from spearfl.algorithms.base import REPORTED_METRICS, ClientContext, ClientResult
from spearfl.federated.codec import WorkOrders, check_reply, layout_of, wire_array
from spearfl.runtime.client import work_order_config
from spearfl.runtime.server import RoundReplies, as_received, choose_clients
from spearfl.runtime.setup import Federation
from spearfl.runtime.worker import WorkerError, exchange, open_connection
from spearfl.seeds import SERVER_CLIENT_ID, derive_seed, numpy_generator

TOKEN_VARIABLE = "SPEARFL_SERVER_TOKEN"
POLL_SECONDS = 1.0  # how often a waiting server asks the devices how many interactions they hold


class DeviceClients:
    """Runs each chosen client's round on its device service; tells every device each round's outcome."""

    def __init__(self, context: ClientContext, federation: Federation, progress: Progress | None):
        self.config = context.config
        self.addresses = list(self.config.live.devices)
        self.token = os.environ.get(TOKEN_VARIABLE) or None
        self.timeout = self.config.live.reply_timeout_seconds  # a device that takes longer is dropped from the round
        self.missed: dict[int, dict[int, bool]] = {}  # client -> round -> accepted, for devices the notice missed
        self.orders = WorkOrders()
        self.nonces: dict[int, str] = {}  # client -> nonce of its work order in the round under way
        self.ending: int | None = None  # a round that ends a federation stage: its notice says so

    def choose(self, round_index: int) -> list[int]:
        """The round's devices: with `live.round_period_seconds`, wait until `clients_per_round` devices have
        `min_interactions` pending (or the period is over) and draw from the ready ones first."""
        config, period = self.config, self.config.live.round_period_seconds
        if period is None:
            return choose_clients(config, round_index)
        wanted, deadline = config.server.clients_per_round, time.monotonic() + period
        while True:
            ready = [client for client, count in enumerate(self.pending_counts()) if count >= config.live.min_interactions]
            if len(ready) >= wanted or time.monotonic() >= deadline:
                break
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        rng = numpy_generator(derive_seed(config.seed, round_index, SERVER_CLIENT_ID, "client-selection"))
        others = [client for client in range(len(self.addresses)) if client not in ready]
        ranked = [ready[i] for i in rng.permutation(len(ready))] + [others[i] for i in rng.permutation(len(others))]
        return sorted(ranked[:wanted])

    def pending_counts(self) -> list[int]:
        """Each device's pending interactions (/health); 0 for a device that does not answer."""
        return [device_pending(address, self.token) for address in self.addresses]

    def train(self, round_index: int, clients: list[int], global_state: dict[str, torch.Tensor], lr: float) -> RoundReplies:
        arrays = {name: wire_array(tensor) for name, tensor in global_state.items()}
        encoding = self.config.server.upload_encoding
        replies = RoundReplies([])
        self.nonces = {client: self.orders.issue(round_index, client) for client in clients}
        for client in clients:
            request = {"config": work_order_config(self.config), "client_id": client, "round_index": round_index, "lr": lr,
                       "nonce": self.nonces[client]}
            header = {"request": request, "settled": {str(r): ok for r, ok in self.missed.get(client, {}).items()}}
            try:
                payload, result = exchange(self.addresses[client], "/worker/train", arrays, header, self.token, self.timeout)
                tensors = checked_payload(payload, global_state, result, encoding)
                self.orders.redeem(round_index, client, result.get("nonce"))
            except (WorkerError, ValueError, KeyError) as error:
                replies.rejected.append({"client": client, "reason": str(error)})
                continue
            self.missed.pop(client, None)
            received = ClientResult(state=global_state, weight=float(result["weight"]), metrics=result["metrics"])
            replies.results.append((client, as_received(received, tensors, global_state, encoding)))
        return replies

    def after_federation(self, round_index: int, global_state: dict[str, torch.Tensor]) -> list[dict]:
        """The round ends a federation stage: its notice tells every device, which then trains after federation as
        its own `personal.method` does (on its own data, taught by the global adapter the notice brings); nothing
        of it comes back to the server."""
        self.ending = round_index
        return []

    def settle(self, round_index: int, replies: RoundReplies, global_state: dict[str, torch.Tensor]) -> None:
        """Every device hears the round's outcome and gets the new global adapter (version = round index), and
        whether the round ends a federation stage."""
        accepted = {client for client, _ in replies.results}
        rejected = {entry["client"] for entry in replies.rejected}
        arrays = {name: wire_array(tensor) for name, tensor in global_state.items()}
        for client, address in enumerate(self.addresses):
            outcome = (client in accepted) if client in accepted | rejected else None  # None: not in this round
            header = {"round": round_index, "accepted": outcome, "version": round_index, "ends_federation": self.ending == round_index}
            if outcome is not None and client in self.nonces:  # the device checks it against the order it answered
                header["nonce"] = self.nonces[client]
            try:
                # the training after federation runs before the device answers the notice that ends a stage
                exchange(address, "/worker/result", arrays, header, self.token, timeout=self.timeout if header["ends_federation"] else 60)
            except WorkerError:
                if outcome is not None:
                    self.missed.setdefault(client, {})[round_index] = outcome


def device_pending(address: str, token: str | None, timeout: float = 10.0) -> int:
    """Pending interactions a device service reports on /health; 0 when it cannot be reached."""
    try:
        connection = open_connection(address, timeout)
    except WorkerError:
        return 0
    try:
        connection.request("GET", "/health", headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        return int(json.loads(response.read()).get("pending", 0)) if response.status == 200 else 0
    except (OSError, ValueError):
        return 0
    finally:
        connection.close()


def checked_payload(
    payload: dict[str, np.ndarray], global_state: dict[str, torch.Tensor], result: dict, encoding: str
) -> dict[str, torch.Tensor]:
    """The reply's payload as tensors if it passes `check_reply` (none when its weight is 0); InvalidReply otherwise."""
    expected = layout_of({name: tensor.numpy() for name, tensor in global_state.items()}, encoding)
    arrays, _ = check_reply(payload, result.get("weight"), result.get("metrics", {}), expected, REPORTED_METRICS)
    if arrays is None:
        return {}
    return {
        name: torch.from_numpy(array.view(np.int16)).view(torch.bfloat16) if array.dtype == np.uint16 else torch.from_numpy(array)
        for name, array in arrays.items()
    }
