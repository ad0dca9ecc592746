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
Left out on purpose: the download (the global adapter goes out in float32), sparsification, and quantisers
with error feedback.
"""

from __future__ import annotations

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
