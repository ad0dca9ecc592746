"""spearfl's messages as Flower records, and the server's checks on every reply before aggregation.

Out (server -> client, message type "train"):
    "adapter"  ArrayRecord   the global LoRA state, float32, keys as `spearfl.lm.models.get_adapter_state` names them
    "work"     ConfigRecord  {"request": JSON of a `spearfl.runtime.client.TrainRequest`}
Back:
    "metrics"  MetricRecord  the client's round metrics plus "weight" (0 = nothing to aggregate)
    "order"    ConfigRecord  {"nonce": the work order's one-time nonce, echoed (spearfl.federated.codec.WorkOrders)}
    "adapter"  ArrayRecord   the upload payload (spearfl.federated.codec): the trained LoRA state in float32, or its
                             update in bfloat16 sent as bit patterns (uint16); absent when the weight is 0
Discovery (message type "query"): the reply's ConfigRecord "node" says which client a SuperNode is.
Round outcomes (message type "query", live runs): "adapter" the new global adapter, "outcome" ConfigRecord
    {"round", "outcome": accepted | rejected | none, "version"}, relayed to the node's device service.

A reply is aggregated only if it passes `read_reply`, which checks each array's declared shape and dtype before
decoding it and then applies `spearfl.federated.codec.check_reply` (as the device-service transport does). Arrays travel as Flower's numpy arrays (never pickled: numpy loads them with
allow_pickle=False). Imports no torch, so the per-message ClientApp process starts fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from spearfl.federated.codec import (  # noqa: F401 - InvalidReply and layout_of are part of this module's interface
    InvalidReply,
    Layout,
    check_keys,
    check_reply,
    layout_of,
    wire_values,
)

ADAPTER, WORK, METRICS, NODE, OUTCOME, ORDER = "adapter", "work", "metrics", "node", "outcome", "order"
WEIGHT = "weight"


@dataclass(frozen=True)
class Reply:
    """An accepted reply: the payload's values as float32 (None when the weight is 0), weight, metrics, bytes."""

    payload: dict[str, np.ndarray] | None
    weight: float
    metrics: dict
    payload_bytes: int
    nonce: str = ""


def adapter_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(array)) for name, array in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def work_content(arrays: dict[str, np.ndarray], request: dict) -> RecordDict:
    return RecordDict({ADAPTER: adapter_record(arrays), WORK: ConfigRecord({"request": json.dumps(request)})})


def read_work(content: RecordDict) -> tuple[dict[str, np.ndarray], dict]:
    """(global adapter, TrainRequest fields) of a train message."""
    return record_arrays(content.array_records[ADAPTER]), json.loads(content.config_records[WORK]["request"])


def metric_values(result: dict) -> dict[str, int | float]:
    """The weight and metrics of a client result as MetricRecord values (int or float; bools become 0/1)."""
    values: dict[str, int | float] = {WEIGHT: float(result["weight"])}
    for key, value in result["metrics"].items():
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            raise TypeError(f"metric {key!r} is {value!r}; metrics must be numbers")
        values[key] = value
    return values


def reply_content(arrays: dict[str, np.ndarray], result: dict) -> RecordDict:
    records = {METRICS: MetricRecord(metric_values(result)), ORDER: ConfigRecord({"nonce": str(result.get("nonce", ""))})}
    if arrays:
        records[ADAPTER] = adapter_record(arrays)
    return RecordDict(records)


def read_reply(content: RecordDict, expected: Layout, required_metrics: tuple[str, ...]) -> Reply:
    """The reply's payload, weight and metrics; InvalidReply names what is wrong with it (`check_reply`).

    required_metrics: the counters every reply must carry, finite (the server's history reads them).
    """
    if METRICS not in content.metric_records:
        raise InvalidReply("no metrics record")
    metrics = dict(content.metric_records[METRICS])
    weight = metrics.pop(WEIGHT, None)
    arrays = declared_arrays(content.array_records[ADAPTER], expected) if ADAPTER in content.array_records else {}
    arrays, weight = check_reply(arrays, weight, metrics, expected, required_metrics)
    nonce = str(content.config_records[ORDER].get("nonce", "")) if ORDER in content.config_records else ""
    if arrays is None:
        return Reply(None, 0.0, metrics, 0, nonce)
    values = {name: wire_values(array) for name, array in arrays.items()}
    return Reply(values, weight, metrics, sum(a.nbytes for a in arrays.values()), nonce)


def declared_arrays(record: ArrayRecord, expected: Layout) -> dict[str, np.ndarray]:
    """The record's arrays, decoded only once each one's declared shape and dtype are the expected ones."""
    check_keys(record.keys(), expected)
    arrays = {}
    for name, (shape, dtype) in expected.items():
        declared = record[name]
        if tuple(declared.shape) != shape or declared.dtype != dtype:  # checked before decoding anything
            raise InvalidReply(f"{name}: {declared.dtype} {tuple(declared.shape)}, expected {dtype} {shape}")
        array = declared.numpy()
        if array.shape != shape or str(array.dtype) != dtype:
            raise InvalidReply(f"{name}: data decodes to {array.dtype} {array.shape}, not the declared {dtype} {shape}")
        arrays[name] = array
    return arrays


def node_content(partition_id: int) -> RecordDict:
    return RecordDict({NODE: ConfigRecord({"partition-id": partition_id})})


def read_node(content: RecordDict) -> int:
    return int(content.config_records[NODE]["partition-id"])


def outcome_content(arrays: dict[str, np.ndarray], round_index: int, accepted: bool | None) -> RecordDict:
    """A round's outcome for one node (its reply accepted, rejected, or it was not in the round) and the new adapter."""
    outcome = "none" if accepted is None else "accepted" if accepted else "rejected"
    return RecordDict({
        ADAPTER: adapter_record(arrays),
        OUTCOME: ConfigRecord({"round": round_index, "outcome": outcome, "version": round_index}),
    })


def read_outcome(content: RecordDict) -> tuple[dict[str, np.ndarray], dict] | None:
    """(new adapter, {"round", "accepted", "version"}) of an outcome message; None for any other query."""
    if OUTCOME not in content.config_records:
        return None
    record = content.config_records[OUTCOME]
    accepted = {"accepted": True, "rejected": False, "none": None}[str(record["outcome"])]
    header = {"round": int(record["round"]), "accepted": accepted, "version": int(record["version"])}
    return record_arrays(content.array_records[ADAPTER]), header
