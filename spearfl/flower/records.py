"""spearfl's messages as Flower records, and the server's checks on every reply before aggregation.

Out (server -> client, message type "train"):
    "adapter"  ArrayRecord   the global LoRA state, float32, keys as `spearfl.lm.models.get_adapter_state` names them
    "work"     ConfigRecord  {"request": JSON of a `spearfl.runtime.client.TrainRequest`}
Back:
    "metrics"  MetricRecord  the client's round metrics plus "weight" (0 = nothing to aggregate)
    "order"    ConfigRecord  {"nonce": the work order's one-time nonce, echoed (spearfl.federated.codec.WorkOrders)}
    "adapter"  ArrayRecord   the upload payload (spearfl.federated.codec): the trained LoRA state in float32, or its
                             update in bfloat16 sent as bit patterns (uint16); absent when the weight is 0
Secure aggregation (server.secure_aggregation: secaggplus): Flower's SecAgg+ forwards a legacy FitIns and expects a
legacy FitRes back, so those rounds speak Flower's legacy records instead of the two above:
    FitIns  parameters: the global adapter's arrays in `secure_order` (sorted names); config {"request": JSON of the
            TrainRequest, "names": JSON of that order}
    FitRes  parameters: the update (trained minus global adapter, float32) in that order, which the client mod masks;
            num_examples: the weight, which the mod folds into the masked sum; metrics: the round metrics and
            "nonce", in the clear
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
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from spearfl.federated.codec import (  # noqa: F401 - InvalidReply and layout_of are part of this module's interface
    InvalidReply,
    Layout,
    check_keys,
    check_counts,
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


def outcome_content(arrays: dict[str, np.ndarray], round_index: int, accepted: bool | None, nonce: str = "") -> RecordDict:
    """A round's outcome for one node (its reply accepted, rejected, or it was not in the round) and the new adapter,
    with the nonce of the node's work order of that round (a device settles a round it answered only with it)."""
    outcome = "none" if accepted is None else "accepted" if accepted else "rejected"
    return RecordDict({
        ADAPTER: adapter_record(arrays),
        OUTCOME: ConfigRecord({"round": round_index, "outcome": outcome, "version": round_index, "nonce": nonce}),
    })


def read_outcome(content: RecordDict) -> tuple[dict[str, np.ndarray], dict] | None:
    """(new adapter, {"round", "accepted", "version"}) of an outcome message; None for any other query."""
    if OUTCOME not in content.config_records:
        return None
    record = content.config_records[OUTCOME]
    accepted = {"accepted": True, "rejected": False, "none": None}[str(record["outcome"])]
    header = {"round": int(record["round"]), "accepted": accepted, "version": int(record["version"])}
    if record.get("nonce"):
        header["nonce"] = str(record["nonce"])
    return record_arrays(content.array_records[ADAPTER]), header


# ------------------------------------------------------------------- secure aggregation (Flower's legacy records)

FIT_PARAMETERS = "fitins.parameters"  # where Flower's legacy records put a FitIns's arrays


def secure_order(arrays) -> list[str]:
    """The fixed order of the adapter's arrays in SecAgg+'s unnamed lists: their names, sorted."""
    return sorted(arrays)


def secure_work(arrays: dict[str, np.ndarray], request: dict) -> FitIns:
    """A work order as the FitIns SecAgg+ forwards to the client in its masking stage."""
    names = secure_order(arrays)
    config = {"request": json.dumps(request), "names": json.dumps(names)}
    return FitIns(ndarrays_to_parameters([np.ascontiguousarray(arrays[name]) for name in names]), config)


def is_secure_work(content: RecordDict) -> bool:
    return FIT_PARAMETERS in content.array_records


def read_secure_work(content: RecordDict) -> tuple[dict[str, np.ndarray], dict]:
    """(global adapter, TrainRequest fields) of a FitIns that SecAgg+ forwarded."""
    fit_ins = recorddict_to_fitins(content, keep_input=True)
    names = json.loads(str(fit_ins.config["names"]))
    values = parameters_to_ndarrays(fit_ins.parameters)  # numpy's own format, loaded with allow_pickle=False
    if len(values) != len(names):
        raise ValueError(f"the work order names {len(names)} arrays but carries {len(values)}")
    return dict(zip(names, values)), json.loads(str(fit_ins.config["request"]))


def secure_reply_content(trained: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray], result: dict) -> RecordDict:
    """The legacy FitRes of a client round: its update (zeros at weight 0) for the mod to mask, its weight as
    num_examples, its metrics and nonce in the clear. `trained`: the float32 upload payload (empty at weight 0)."""
    names = secure_order(global_arrays)
    update = [trained[name] - global_arrays[name] if trained else np.zeros_like(global_arrays[name]) for name in names]
    values = metric_values(result)
    metrics = {key: value for key, value in values.items() if key != WEIGHT} | {"nonce": str(result.get("nonce", ""))}
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), values[WEIGHT], metrics)
    return fitres_to_recorddict(fit_res, keep_input=False)


def read_secure_reply(fit_res: FitRes, asked: int, required_metrics: tuple[str, ...]) -> tuple[float, dict, str]:
    """(weight, metrics, nonce) of the clear part of a SecAgg+ reply; InvalidReply says what is wrong with it.

    The weight must not exceed `asked`, the prompts the server asked for: it scales the client's masked share."""
    metrics = dict(fit_res.metrics)
    nonce = metrics.pop("nonce", "")
    weight = check_counts(fit_res.num_examples, metrics, required_metrics)
    if weight > asked:
        raise InvalidReply(f"weight {weight:g} exceeds the {asked} prompts asked for")
    return weight, metrics, nonce


def read_aggregate(parameters: Parameters, expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unmasked weighted mean of the updates as float32 arrays named in `secure_order`, if it has the shapes of
    `expected` (the global adapter) and only finite values; InvalidReply otherwise."""
    names = secure_order(expected)
    values = parameters_to_ndarrays(parameters)
    if len(values) != len(names):
        raise InvalidReply(f"the aggregate has {len(values)} arrays, the adapter {len(names)}")
    aggregate = {}
    for name, array in zip(names, values):
        if array.shape != expected[name].shape:
            raise InvalidReply(f"the aggregate's {name} has shape {array.shape}, expected {expected[name].shape}")
        not_finite = int((~np.isfinite(array)).sum())
        if not_finite:
            raise InvalidReply(f"the aggregate's {name} has {not_finite} values that are not finite")
        aggregate[name] = array.astype(np.float32)
    return aggregate
