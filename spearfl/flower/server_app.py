"""The Flower ServerApp: the server loop the local runtime runs, with the clients reached by Flower messages.

Run config (`[tool.flwr.app.config]` in pyproject.toml; `flwr run . --run-config "key=value ..."`):
  config           spearfl YAML config; a relative path is taken from the app folder (where pyproject.toml is)
  set              spearfl overrides, as `spearfl run --set` takes them, separated by spaces:
                   "server.rounds=2 seed=1 output_dir=/data/runs/flower"
  reply-timeout    seconds a round waits for its replies; a client that has not answered by then is dropped
  connect-timeout  seconds the first round waits for every client's SuperNode to connect
  node-binding     run (default): a client id, once a SuperNode claims it, belongs to that node for the rest of
                   the ServerApp's run, and a node holds one client id; persistent: the binding is kept in the
                   checkpoint too, for a SuperLink with `--enable-supernode-auth`, where a node's id is that of
                   its registered public key and survives its restarts (without authentication a restarted
                   SuperNode gets a fresh id, which a persistent binding would refuse)

The run folder (config.yaml, history.jsonl, summary.json, adapters, checkpoint, plot) is the one the local
runtime writes, in `output_dir`; a relative output_dir is taken from the SuperLink's working directory,
where Flower runs the ServerApp. Running the same config again resumes it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from spearfl.algorithms import CONFIG_SECTIONS
from spearfl.algorithms.base import REPORTED_METRICS, ClientResult
from spearfl.config import RunConfig
from spearfl.federated.codec import WorkOrders, decode_upload
from spearfl.flower.records import (
    InvalidReply,
    layout_of,
    outcome_content,
    read_node,
    read_reply,
    secure_work,
    work_content,
)
from spearfl.flower.run_config import configured
from spearfl.flower.secure import round_replies, run_secure_round
from spearfl.lm.models import quiet_library_output
from spearfl.runtime.client import work_order_config
from spearfl.runtime.server import FederatedRun, RoundReplies, choose_clients, console
from spearfl.runtime.setup import check_config

POLL_SECONDS = 0.2  # between pulls for replies; Flower's own send_and_receive waits 3 s between pulls


def config_from_run_config(run_config: dict) -> RunConfig:
    """The spearfl config named by the run config's `config`, with its `set` overrides, validated and checked."""
    config = configured(run_config)
    check_config(config)
    return config


class FlowerClients:
    """Runs a round's client updates on the SuperNodes that hold those clients, and checks every reply."""

    def __init__(self, grid: Grid, config: RunConfig, reply_timeout: float, connect_timeout: float, persistent_binding: bool = False):
        self.grid = grid
        self.bound: dict[int, int] = {}  # client id -> the node that first claimed it, connected or not
        self.issued: dict[tuple[int, int], str] = {}  # (round, client) -> the nonce of its work order, until the notice
        self.persistent_binding = persistent_binding
        self.config = config
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.missed: dict[int, dict[int, bool]] = {}  # live runs: client -> round -> accepted, not yet heard by it
        self.orders = WorkOrders()

    def choose(self, round_index: int) -> list[int]:
        return choose_clients(self.config, round_index)

    def train(self, round_index: int, clients: list[int], global_state: dict[str, torch.Tensor], lr: float) -> RoundReplies:
        self.find_nodes(clients, wait=not self.nodes)
        if self.config.server.secure_aggregation == "secaggplus":
            return self.train_securely(round_index, clients, global_state, lr)
        arrays = {name: tensor.numpy() for name, tensor in global_state.items()}
        reachable = [client for client in clients if client in self.nodes]
        messages = [
            Message(
                work_content(arrays, self.work_order(round_index, client, lr)),
                dst_node_id=self.nodes[client],
                message_type=MessageType.TRAIN,
                group_id=str(round_index),
            )
            for client in reachable
        ]
        replies = dict(zip(reachable, self.exchange(messages, self.reply_timeout)))
        expected = layout_of(arrays, self.config.server.upload_encoding)
        accepted, rejected = [], []
        for client in clients:
            try:
                result, nonce = self.accept(replies.get(client), global_state, expected, client in self.nodes)
                self.orders.redeem(round_index, client, nonce)
                accepted.append((client, result))
            except InvalidReply as error:
                rejected.append({"client": client, "reason": str(error)})
        console.print(f"round {round_index}: {len(accepted)} of {len(clients)} client replies aggregated")
        return RoundReplies(accepted, rejected)

    def work_order(self, round_index: int, client: int, lr: float) -> dict:
        """The TrainRequest fields of a client's round, with a fresh one-time nonce."""
        nonce = self.orders.issue(round_index, client)
        self.issued[(round_index, client)] = nonce  # the round's notice brings it back to the device
        order = {"config": work_order_config(self.config), "client_id": client, "round_index": round_index, "lr": lr, "nonce": nonce}
        return order | self.settled_for(client)

    def train_securely(self, round_index: int, clients: list[int], global_state: dict[str, torch.Tensor], lr: float) -> RoundReplies:
        """The round through SecAgg+ (spearfl.flower.secure): each accepted client's result is the round's aggregate."""
        settings = self.config.server.secaggplus
        arrays = {name: tensor.numpy() for name, tensor in global_state.items()}
        nodes = {client: self.nodes[client] for client in clients if client in self.nodes}
        work = {node: secure_work(arrays, self.work_order(round_index, client, lr)) for client, node in nodes.items()}
        asked = self.config.budget(CONFIG_SECTIONS[self.config.algorithm]).prompts_per_round
        outcome = run_secure_round(self.exchange, work, round_index, settings, asked, settings.timeout or self.reply_timeout)
        accepted, rejected = round_replies(
            outcome, nodes, global_state, asked, lambda client, nonce: self.orders.redeem(round_index, client, nonce), REPORTED_METRICS, settings
        )
        rejected += [{"client": client, "reason": "no SuperNode of this client is connected"} for client in clients if client not in nodes]
        console.print(f"round {round_index}: the secure sum of {len(accepted)} of {len(clients)} clients aggregated")
        return RoundReplies(accepted, rejected)

    def settled_for(self, client: int) -> dict:
        """Live runs: the outcomes of this client's earlier rounds that its device has not heard, for its work order."""
        if not self.config.live.on_flower:
            return {}
        return {"settled": {str(r): accepted for r, accepted in self.missed.pop(client, {}).items()}}

    def settle(self, round_index: int, replies: RoundReplies, global_state: dict[str, torch.Tensor]) -> None:
        """Live runs (`live.on_flower`): every node hears the round's outcome with the new global adapter, which its
        ClientApp relays to the device service; an outcome that does not arrive rides on the next work order."""
        if not self.config.live.on_flower:
            return
        accepted = {client for client, _ in replies.results}
        rejected = {entry["client"] for entry in replies.rejected}
        arrays = {name: tensor.numpy() for name, tensor in global_state.items()}
        clients = sorted(self.nodes)
        outcomes = {client: (client in accepted) if client in accepted | rejected else None for client in clients}
        messages = [
            Message(outcome_content(arrays, round_index, outcomes[client], self.issued.pop((round_index, client), "")), dst_node_id=self.nodes[client],
                    message_type=MessageType.QUERY, group_id=f"outcome-{round_index}")
            for client in clients
        ]
        for client, reply in zip(clients, self.exchange(messages, self.reply_timeout)):
            if (reply is None or reply.has_error()) and outcomes[client] is not None:
                self.missed.setdefault(client, {})[round_index] = outcomes[client]

    def accept(self, reply: Message | None, global_state, expected, has_node: bool) -> tuple[ClientResult, str]:
        """The client's result as the server aggregates it and the nonce it carries, or InvalidReply saying why there
        is none."""
        if not has_node:
            raise InvalidReply("no SuperNode of this client is connected")
        if reply is None:
            raise InvalidReply(f"no reply within {self.reply_timeout:g} s")
        if reply.has_error():
            raise InvalidReply(f"the client failed: {reply.error.reason[-500:]}")
        received = read_reply(reply.content, expected, REPORTED_METRICS)
        metrics = received.metrics | {"upload_bytes": received.payload_bytes}
        if received.payload is None:
            return ClientResult(state=global_state, weight=0.0, metrics=metrics), received.nonce
        payload = {name: torch.from_numpy(values) for name, values in received.payload.items()}
        state = decode_upload(payload, global_state, self.config.server.upload_encoding)
        return ClientResult(state=state, weight=received.weight, metrics=metrics), received.nonce

    def exchange(self, messages: list[Message], timeout: float) -> list[Message | None]:
        """Push the messages, pull their replies until all are in or the timeout passes; None for a missing one."""
        if not messages:
            return []
        ids = list(self.grid.push_messages(messages))
        replies: dict[str, Message] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([i for i in ids if i not in replies]):
                replies[reply.metadata.reply_to_message_id] = reply
            if len(replies) < len(ids):
                time.sleep(POLL_SECONDS)
        return [replies.get(message_id) for message_id in ids]

    def find_nodes(self, clients: list[int], wait: bool) -> None:
        """Learn which SuperNode holds each client; on the first round wait until all of the run's clients have one."""
        needed = set(range(self.config.data.num_clients)) if wait else set(clients)
        deadline = time.monotonic() + (self.connect_timeout if wait else 0)
        while True:
            connected = set(self.grid.get_node_ids())
            self.nodes = {client: node for client, node in self.nodes.items() if node in connected}
            unknown = sorted(connected - set(self.nodes.values()))
            queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in unknown]
            for node, reply in zip(unknown, self.exchange(queries, timeout=60)):
                self.record_node(node, reply)
            if needed <= self.nodes.keys() or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if wait and not needed <= self.nodes.keys():
            raise RuntimeError(
                f"after {self.connect_timeout:g} s, clients {sorted(needed - self.nodes.keys())} of data.num_clients="
                f"{self.config.data.num_clients} have no SuperNode ({len(connected)} connected, holding clients "
                f"{sorted(self.nodes)}); start one SuperNode per client with --node-config "
                f"'partition-id=I num-partitions={self.config.data.num_clients}' (simulation: --federation-config "
                f"num-supernodes={self.config.data.num_clients})"
            )

    def record_node(self, node: int, reply: Message | None) -> None:
        if reply is None or reply.has_error():
            reason = "no reply" if reply is None else reply.error.reason[:300]
            console.print(f"[yellow]SuperNode {node} did not say which client it is: {reason}[/yellow]")
            return
        client = read_node(reply.content)
        held = next((other for other, bound_node in self.bound.items() if bound_node == node), None)
        if not 0 <= client < self.config.data.num_clients:
            console.print(f"[yellow]SuperNode {node} holds client {client}, outside 0..{self.config.data.num_clients - 1}[/yellow]")
        elif client in self.bound and self.bound[client] != node:
            console.print(f"[yellow]SuperNode {node} claims client {client}, which belongs to SuperNode {self.bound[client]}; refused[/yellow]")
        elif held is not None and held != client:
            console.print(f"[yellow]SuperNode {node} holds client {held} and now claims client {client}; refused[/yellow]")
        else:
            self.bound[client] = self.nodes[client] = node

    def state(self) -> dict:
        """The bindings a restarted ServerApp keeps (with `node-binding: persistent`)."""
        return {"bound": {str(client): node for client, node in self.bound.items()}} if self.persistent_binding else {}

    def restore(self, state: dict) -> None:
        if self.persistent_binding:
            self.bound = {int(client): int(node) for client, node in state.get("bound", {}).items()}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the configured experiment with its clients on Flower SuperNodes."""
    quiet_library_output()
    config = config_from_run_config(context.run_config)
    # Flower fills the run config from pyproject.toml's [tool.flwr.app.config], where the defaults live.
    reply_timeout = float(context.run_config["reply-timeout"])
    connect_timeout = float(context.run_config["connect-timeout"])
    binding = str(context.run_config.get("node-binding", "run"))
    if binding not in ("run", "persistent"):
        raise ValueError(f"run config node-binding={binding!r}: choose run or persistent")
    console.print(f"spearfl run folder: {Path(config.output_dir).resolve()}")

    def runner(server_context, federation, progress) -> FlowerClients:
        return FlowerClients(grid, config, reply_timeout, connect_timeout, persistent_binding=binding == "persistent")

    FederatedRun(config, runner, show_progress=False).run()
