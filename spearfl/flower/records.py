"""spearfl's messages as Flower records, and the server's checks on every reply before aggregation.

Out (server -> client, message type "train"):
    "adapter"  ArrayRecord   the global LoRA state, float32, keys as `spearfl.lm.models.get_adapter_state` names them
    "work"     ConfigRecord  {"request": JSON of a `spearfl.runtime.client.TrainRequest`}
Back:
    "metrics"  MetricRecord  the client's round metrics plus "weight" (0 = nothing to aggregate)
    "adapter"  ArrayRecord   the upload payload (spearfl.federated.codec): the trained LoRA state in float32, or its
                             update in bfloat16 sent as bit patterns (uint16); absent when the weight is 0
Discovery (message type "query"): the reply's ConfigRecord "node" says which client a SuperNode is.
Round outcomes (message type "query", live runs): "adapter" the new global adapter, "outcome" ConfigRecord
    {"round", "outcome": accepted | rejected | none, "version"}, relayed to the node's device service.

A reply is aggregated only if it passes `read_reply`: the expected keys, shapes and dtype, finite values,
a finite weight between 0 and the number of prompts of the client's round (a weight counts prompts trained on),
and every counter the server
names as required (`spearfl.algorithms.base.REPORTED_METRICS`). Arrays travel as Flower's numpy arrays (never pickled: numpy loads them with
allow_pickle=False). Imports no torch, so the per-message ClientApp process starts fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from spearfl.federated.codec import WIRE_DTYPES, wire_values

ADAPTER, WORK, METRICS, NODE, OUTCOME = "adapter", "work", "metrics", "node", "outcome"
WEIGHT = "weight"

# (shape, dtype name) of each adapter tensor the server expects back
Layout = dict[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Reply:
    """An accepted reply: the payload's values as float32 (None when the weight is 0), weight, metrics, bytes."""

    payload: dict[str, np.ndarray] | None
    weight: float
    metrics: dict
    payload_bytes: int


class InvalidReply(ValueError):
    """A client's reply that must not be aggregated; the message says what is wrong with it."""


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
    records = {METRICS: MetricRecord(metric_values(result))}
    if arrays:
        records[ADAPTER] = adapter_record(arrays)
    return RecordDict(records)


def layout_of(arrays: dict[str, np.ndarray], encoding: str = "float32") -> Layout:
    """What a reply's payload must look like for an adapter of these arrays sent with this upload encoding."""
    return {name: (tuple(array.shape), WIRE_DTYPES[encoding]) for name, array in arrays.items()}


def read_reply(content: RecordDict, expected: Layout, required_metrics: tuple[str, ...]) -> Reply:
    """The reply's payload, weight and metrics; InvalidReply names what is wrong with it.

    required_metrics: the counters every reply must carry, finite (the server's history reads them).
    """
    if METRICS not in content.metric_records:
        raise InvalidReply("no metrics record")
    metrics = dict(content.metric_records[METRICS])
    weight = metrics.pop(WEIGHT, None)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise InvalidReply(f"weight must be a finite number >= 0, got {weight!r}")
    missing = [key for key in required_metrics if key not in metrics]
    if missing:
        raise InvalidReply(f"metrics missing {missing}")
    bad = [key for key in required_metrics if not isinstance(metrics[key], (int, float)) or not math.isfinite(metrics[key])]
    if bad:
        raise InvalidReply(f"metrics not finite numbers: {bad}")
    if weight > metrics["prompts"]:
        raise InvalidReply(f"weight {weight} exceeds the {metrics['prompts']} prompts of the client's round")
    if weight == 0:
        return Reply(None, 0.0, metrics, 0)
    if ADAPTER not in content.array_records:
        raise InvalidReply(f"weight {weight} but no adapter")
    arrays = check_adapter(content.array_records[ADAPTER], expected)
    return Reply({name: wire_values(array) for name, array in arrays.items()}, float(weight), metrics, sum(a.nbytes for a in arrays.values()))


def check_adapter(record: ArrayRecord, expected: Layout) -> dict[str, np.ndarray]:
    """The payload's wire arrays, if they have exactly the expected keys, shapes and dtype and only finite values."""
    missing, unexpected = sorted(expected.keys() - record.keys()), sorted(record.keys() - expected.keys())
    if missing or unexpected:
        raise InvalidReply(f"adapter keys differ: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    arrays = {}
    for name, (shape, dtype) in expected.items():
        declared = record[name]
        if tuple(declared.shape) != shape or declared.dtype != dtype:  # checked before decoding anything
            raise InvalidReply(f"{name}: {declared.dtype} {tuple(declared.shape)}, expected {dtype} {shape}")
        array = declared.numpy()
        if array.shape != shape or str(array.dtype) != dtype:
            raise InvalidReply(f"{name}: data decodes to {array.dtype} {array.shape}, not the declared {dtype} {shape}")
        not_finite = int((~np.isfinite(wire_values(array))).sum())
        if not_finite:
            raise InvalidReply(f"{name}: {not_finite} values are not finite")
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
