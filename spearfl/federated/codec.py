"""How a client's trained adapter travels to the server: the upload encodings, as pure functions.

- "float32": the trained adapter as it is, 4 bytes a parameter.
- "bfloat16": the update (trained minus global adapter) in bfloat16, 2 bytes a parameter. The server adds it
  back to the global adapter it sent, in float32. Rounding the update rather than the weights keeps the
  error relative to the update (bfloat16 keeps 8 significant bits): a LoRA update is small next to the
  weights it changes, and rounding the weights themselves would erase much of it.

The server always aggregates float32 states, so every strategy (FedAvg, FedAdam, FedYogi) works on any
encoding; the local runtime applies the same encode / decode pair, so its results are those of a deployment.
Left out on purpose: the download (the global adapter goes out in float32), sparsification, and quantisers
with error feedback.
"""

from __future__ import annotations

import torch

AdapterState = dict[str, torch.Tensor]

UPLOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def encode_upload(state: AdapterState, global_state: AdapterState, encoding: str) -> AdapterState:
    """What a client sends for its trained `state`, given the `global_state` it started from."""
    if encoding == "float32":
        return {name: tensor.to(torch.float32) for name, tensor in state.items()}
    if encoding == "bfloat16":
        return {name: (tensor.float() - global_state[name].float()).to(torch.bfloat16) for name, tensor in state.items()}
    raise ValueError(f"unknown upload encoding {encoding!r}; choose from {sorted(UPLOAD_DTYPES)}")


def decode_upload(payload: AdapterState, global_state: AdapterState, encoding: str) -> AdapterState:
    """The float32 adapter state the server aggregates, from a client's payload."""
    if encoding == "float32":
        return {name: tensor.to(torch.float32) for name, tensor in payload.items()}
    if encoding == "bfloat16":
        return {name: global_state[name].float() + tensor.float() for name, tensor in payload.items()}
    raise ValueError(f"unknown upload encoding {encoding!r}; choose from {sorted(UPLOAD_DTYPES)}")


def payload_bytes(payload: AdapterState) -> int:
    """Bytes of tensor data in a payload (what goes over the network, headers aside)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in payload.values())
