"""The Flower ClientApp: unpack the work order, run the client update the local runtime runs, pack the reply.

Node config (`flower-supernode --node-config`; the simulation engine sets the first two itself):
  partition-id    int, required: which client of the federation this node is (0 .. data.num_clients - 1)
  num-partitions  int, optional: must equal the run's data.num_clients
  worker          str, optional: host:port of this device's `spearfl client-worker`, which keeps the base model
                  loaded across rounds (in a deployment Flower starts a new ClientApp process for every message)
  examples        str, optional: path of this device's own JSONL examples, used instead of its partition of the
                  configured dataset
  device-config   str, optional: path of this device's own spearfl YAML config: its data, feedback verifiers,
                  privacy and limits (a work order carries only training settings). Without it the device takes
                  the run's config as its own, which is what a simulation means and a deployment must not do
  service         str, optional: host:port of this device's `spearfl serve`, whose people's judged interactions the
                  rounds train on (a live run, `live.on_flower`); the server's token it sends comes from
                  $SPEARFL_SERVER_TOKEN (as for a worker), an https:// address is verified against $SPEARFL_TLS_CA
Without a worker the update runs in this process on a model cached for the life of the process: the
simulation engine keeps its processes for the whole run, so there the model loads once per process.

Under a personalization method (the device's own `personal.method`) the client's personal adapter is the node's:
without a worker it lives in the node's state (`context.state`, which Flower keeps for the node across the run's
rounds), put into the client host before a round and taken back after; a client worker keeps it itself, and a
device service beside its store. It never travels in a message.

Under secure aggregation (server.secure_aggregation: secaggplus) Flower's `secaggplus_mod` answers the protocol's
messages around the train handler, which then receives a legacy FitIns and answers with the round's update as a
legacy FitRes (spearfl.flower.records); every other message passes the mod unchanged.
"""

from __future__ import annotations

import functools
import os

from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from spearfl.flower.records import (
    adapter_record,
    record_arrays,
    is_secure_work,
    node_content,
    read_outcome,
    read_secure_work,
    read_work,
    reply_content,
    secure_reply_content,
)
from spearfl.flower.run_config import device_settings
from spearfl.runtime.worker import exchange, train_on_worker

TOKEN_VARIABLE = "SPEARFL_SERVER_TOKEN"  # the token of work orders and round notices, never the people's

app = ClientApp()


def partition_id(context: Context) -> int:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=I num-partitions=N'")
    return int(node["partition-id"])


@app.query()
def describe(message: Message, context: Context) -> Message:
    """Tell the server which client this node is; or relay a round's outcome to this node's device service."""
    outcome = read_outcome(message.content)
    if outcome is None:
        return Message(node_content(partition_id(context)), reply_to=message)
    if "service" in context.node_config:
        exchange(str(context.node_config["service"]), "/worker/result", *outcome, token=os.environ.get(TOKEN_VARIABLE))
    return Message(RecordDict(), reply_to=message)


def secure_aggregation_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client for the protocol's messages (they carry its stage); any other passes unchanged, so a
    run without secure aggregation never meets the mod (which would refuse a message without a stage)."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


@app.train(mods=[secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    """One client round on this node's examples, from the global adapter in the message (a SecAgg+ FitIns under
    secure aggregation, whose reply is the update for the mod to mask)."""
    secure = is_secure_work(message.content)
    arrays, request = read_secure_work(message.content) if secure else read_work(message.content)
    node, client = context.node_config, partition_id(context)
    if request["client_id"] != client:
        raise ValueError(f"work for client {request['client_id']} reached the node of client {client}")
    settled = request.pop("settled", {})  # round outcomes a live device has not heard yet
    if "service" in node:  # the device service holds its own config
        header = {"request": request, "settled": settled}
        state, result = exchange(str(node["service"]), "/worker/train", arrays, header, token=os.environ.get(TOKEN_VARIABLE))
    else:
        device = device_settings(node, context.run_config)
        num_clients = device["config"]["data"]["num_clients"]
        if "num-partitions" in node and int(node["num-partitions"]) != num_clients:
            raise ValueError(f"node config num-partitions={node['num-partitions']} but the device's config has data.num_clients={num_clients}")
        if "worker" in node:
            state, result = train_on_worker(str(node["worker"]), arrays, request, token=os.environ.get(TOKEN_VARIABLE), device=device)
        else:
            host = in_process_host()
            host.personal.pop(client, None)  # this node's own, from its state alone
            if PERSONAL in context.state.array_records:
                host.personal[client] = personal_tensors(context.state.array_records[PERSONAL])
            state, result = host.train_arrays(arrays, request, device)
            if client in host.personal:
                context.state[PERSONAL] = adapter_record({name: t.numpy() for name, t in host.personal.pop(client).items()})
    content = secure_reply_content(state, arrays, result) if secure else reply_content(state, result)
    return Message(content, reply_to=message)


PERSONAL = "spearfl.personal"  # the node state's record of the client's personal adapter


def personal_tensors(record) -> dict:
    import torch

    return {name: torch.from_numpy(array.copy()) for name, array in record_arrays(record).items()}


@functools.cache
def in_process_host():
    """This process's ClientHost, created on first use (it imports torch and loads the model)."""
    from spearfl.runtime.client import ClientHost

    return ClientHost()
