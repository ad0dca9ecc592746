"""How a client's trained adapter travels to the server: the upload encodings, as pure functions.

- "float32": the trained adapter as it is, 4 bytes a parameter.
- "bfloat16": the update (trained minus global adapter) in bfloat16, 2 bytes a parameter. The server adds it
  back to the global adapter it sent, in float32. Rounding the update rather than the weights keeps the
  error relative to the update (bfloat16 keeps 8 significant bits): a LoRA update is small next to the
  weights it changes, and rounding the weights themselves would erase much of it.

On the wire (Flower's arrays, the client worker's safetensors payload) tensors travel as numpy arrays; numpy
has no bfloat16, so a bfloat16 payload travels as its bit patterns (uint16): `wire_array` on the client,
`wire_values` on the server, which checks and decodes a reply without torch.

The server always aggregates float32 states, so every strategy (FedAvg, FedAdam, FedYogi) works on any
encoding; the local runtime applies the same encode / decode pair, so its results are those of a deployment.
Every reply passes `check_reply` before aggregation, whichever transport brought it (Flower's records, a device
service's payload): the expected keys, shapes and wire dtype, finite values, a finite weight between 0 and the
prompts of the client's round (a weight counts prompts trained on), and every counter the server requires.
Left out on purpose: the download (the global adapter goes out in float32), sparsification, and quantisers
with error feedback.
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are handled: a Flower ClientApp process reads the wire format without it.
AdapterState = dict[str, "torch.Tensor"]

UPLOAD_ENCODINGS = ("float32", "bfloat16")
WIRE_DTYPES = {"float32": "float32", "bfloat16": "uint16"}  # upload encoding -> numpy dtype on the wire


def encode_upload(state: AdapterState, global_state: AdapterState, encoding: str) -> AdapterState:
    """What a client sends for its trained `state`, given the `global_state` it started from."""
    import torch

    if encoding == "float32":
        return {name: tensor.to(torch.float32) for name, tensor in state.items()}
    if encoding == "bfloat16":
        return {name: (tensor.float() - global_state[name].float()).to(torch.bfloat16) for name, tensor in state.items()}
    raise ValueError(f"unknown upload encoding {encoding!r}; choose from {list(UPLOAD_ENCODINGS)}")


def decode_upload(payload: AdapterState, global_state: AdapterState, encoding: str) -> AdapterState:
    """The float32 adapter state the server aggregates, from a client's payload."""
    import torch

    if encoding == "float32":
        return {name: tensor.to(torch.float32) for name, tensor in payload.items()}
    if encoding == "bfloat16":
        return {name: global_state[name].float() + tensor.float() for name, tensor in payload.items()}
    raise ValueError(f"unknown upload encoding {encoding!r}; choose from {list(UPLOAD_ENCODINGS)}")


def payload_bytes(payload: AdapterState) -> int:
    """Bytes of tensor data in a payload (what goes over the network, headers aside)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in payload.values())


def wire_array(tensor: "torch.Tensor") -> np.ndarray:
    """A payload tensor as numpy; numpy has no bfloat16, so those travel as their bit patterns (uint16)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def wire_values(array: np.ndarray) -> np.ndarray:
    """float32 values of a wire array; uint16 arrays are bfloat16 bit patterns (the upper half of a float32)."""
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


# (shape, dtype name) of each adapter tensor the server expects back
Layout = dict[str, tuple[tuple[int, ...], str]]


class InvalidReply(ValueError):
    """A client's reply that must not be aggregated; the message says what is wrong with it."""


def layout_of(arrays: dict[str, np.ndarray], encoding: str = "float32") -> Layout:
    """What a reply's payload must look like for an adapter of these arrays sent with this upload encoding."""
    return {name: (tuple(array.shape), WIRE_DTYPES[encoding]) for name, array in arrays.items()}


def check_counts(weight, metrics: dict, required_metrics: tuple[str, ...]) -> float:
    """The reply's weight, if it and the required metrics are finite numbers and the weight is within 0..prompts."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise InvalidReply(f"weight must be a finite number >= 0, got {weight!r}")
    missing = [key for key in required_metrics if key not in metrics]
    if missing:
        raise InvalidReply(f"metrics missing {missing}")
    bad = [key for key in required_metrics if not isinstance(metrics[key], (int, float)) or not math.isfinite(metrics[key])]
    if bad:
        raise InvalidReply(f"metrics not finite numbers: {bad}")
    if "prompts" in metrics and weight > metrics["prompts"]:
        raise InvalidReply(f"weight {weight} exceeds the {metrics['prompts']} prompts of the client's round")
    return float(weight)


def check_keys(names, expected: Layout) -> None:
    missing, unexpected = sorted(expected.keys() - set(names)), sorted(set(names) - expected.keys())
    if missing or unexpected:
        raise InvalidReply(f"adapter keys differ: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def check_arrays(arrays: dict[str, np.ndarray], expected: Layout) -> None:
    """The payload has exactly the expected keys, shapes and wire dtype, and only finite values."""
    check_keys(arrays, expected)
    for name, (shape, dtype) in expected.items():
        array = arrays[name]
        if array.shape != shape or str(array.dtype) != dtype:
            raise InvalidReply(f"{name}: {array.dtype} {array.shape}, expected {dtype} {shape}")
        not_finite = int((~np.isfinite(wire_values(array))).sum())
        if not_finite:
            raise InvalidReply(f"{name}: {not_finite} values are not finite")


def check_reply(
    arrays: dict[str, np.ndarray], weight, metrics: dict, expected: Layout, required_metrics: tuple[str, ...]
) -> tuple[dict[str, np.ndarray] | None, float]:
    """(the payload's arrays, or None for weight 0; the weight) of a reply that may be aggregated; InvalidReply
    naming what is wrong otherwise."""
    weight = check_counts(weight, metrics, required_metrics)
    if weight == 0:
        return None, 0.0
    if not arrays:
        raise InvalidReply(f"weight {weight} but no adapter")
    check_arrays(arrays, expected)
    return arrays, weight


class WorkOrders:
    """The one-time nonces of the work orders a server sent: a reply counts only if it carries the nonce of the work
    order it answers, once. A reply replayed from an earlier round, sent twice, or made for another client fails."""

    def __init__(self) -> None:
        self.open: dict[tuple[int, int], str] = {}  # (round, client) -> nonce of the work order awaiting its reply

    def issue(self, round_index: int, client: int) -> str:
        nonce = secrets.token_hex(16)
        self.open[(round_index, client)] = nonce
        return nonce

    def redeem(self, round_index: int, client: int, nonce) -> None:
        """Close the work order; InvalidReply unless `nonce` is its own and it is still open."""
        expected = self.open.get((round_index, client))
        if expected is None:
            raise InvalidReply(f"no open work order of round {round_index} for client {client} (a duplicate or stale reply)")
        if not isinstance(nonce, str) or not secrets.compare_digest(nonce, expected):
            raise InvalidReply(f"the reply's nonce is not that of client {client}'s round {round_index} work order (replayed or forged)")
        del self.open[(round_index, client)]
