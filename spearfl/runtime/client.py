"""A client device's long-lived side: the base model loaded once, the client's examples, one update per request.

The Flower ClientApp (in simulation) and the client worker (`spearfl client-worker`, in a deployment) hold
one `ClientHost` for the life of their process. Each request carries the run config and the work order; the
host runs the very client update the local runtime runs, on the same work order, so results carry over.
The model is reloaded only when a request names another model or LoRA shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientContext, ClientResult, ClientRound, ClientUpdate
from spearfl.config import RunConfig, validate
from spearfl.data import load_jsonl
from spearfl.data.schema import Example
from spearfl.federated.codec import encode_upload, wire_array
from spearfl.federated.privacy import noise_generator, noised_locally
from spearfl.lm.models import load_base_model, quiet_library_output
from spearfl.runtime.adversary import acting_client, behave
from spearfl.runtime.setup import (
    attach_configured_lora,
    client_context,
    prepare_data,
    with_label_style,
)


@dataclass(frozen=True)
class TrainRequest:
    """One client round, as the server orders it."""

    config: dict  # the run config, as spearfl.config.config_to_dict writes it
    client_id: int
    round_index: int
    lr: float
    examples_path: str | None = None  # the device's own JSONL examples; None: its partition of the configured dataset
    nonce: str = ""  # the server's one-time token for this work order; the reply carries it back

    def run_config(self) -> RunConfig:
        return validate(self.config, source="the run config sent by the server")


class ClientHost:
    """Holds the base model with LoRA and the client's examples across rounds; runs client updates."""

    def __init__(self) -> None:
        quiet_library_output()
        self.model_key: tuple | None = None
        self.models_loaded = 0
        self.model = None
        self.tokenizer = None
        self.examples: dict[tuple, list[Example]] = {}  # a Flower simulation worker serves several clients

    def train(self, request: TrainRequest, global_state: dict[str, torch.Tensor]) -> ClientResult:
        """Run the configured client update on this client's examples, from the given global adapter."""
        config = request.run_config()
        context = self.context_for(config)
        acting = acting_client(config, request.client_id)
        examples = self.examples_for(config, dataclasses.replace(request, client_id=acting))
        work = ClientRound(acting, request.round_index, examples, global_state, request.lr, config.seed)
        return run_client(ALGORITHMS[config.algorithm], context, work)

    def train_arrays(self, arrays: dict[str, np.ndarray], request: dict) -> tuple[dict[str, np.ndarray], dict]:
        """`train` with numpy in and out, for transports: (upload payload, {"weight", "metrics", "nonce"}).

        The payload is the configured upload encoding of the trained adapter (spearfl.federated.codec), as numpy
        arrays (bfloat16 as its bit patterns, uint16); it is empty when the weight is 0.
        """
        global_state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in arrays.items()}
        request = TrainRequest(**request)
        result = self.train(request, global_state)
        payload = upload(result, global_state, request.run_config().server.upload_encoding)
        reply = {"weight": result.weight, "metrics": result.metrics, "nonce": request.nonce}
        return {name: wire_array(tensor) for name, tensor in payload.items()}, reply

    def context_for(self, config: RunConfig) -> ClientContext:
        """The client context for this config, loading the base model only if its settings changed."""
        if config.threads:
            torch.set_num_threads(config.threads)
        # FFA-LoRA never sends A: it must be the run seed's, so a run with another seed needs a fresh adapter.
        key = (config.model.model_dump_json(), config.lora.model_dump_json(), config.seed if config.lora.ffa else None)
        if key != self.model_key:
            self.model = None  # let the old model go before loading the next
            model, self.tokenizer = load_base_model(config.model)
            self.model, self.model_key = attach_configured_lora(model, config), key
            self.models_loaded += 1
        return client_context(config, self.model, self.tokenizer)

    def examples_for(self, config: RunConfig, request: TrainRequest) -> list[Example]:
        """The device's own examples file, or its partition of the configured dataset (as the local runtime draws it)."""
        key = (request.examples_path, request.client_id, config.seed, config.data.model_dump_json())
        if key not in self.examples:
            if request.examples_path:
                self.examples[key] = with_label_style(load_jsonl(request.examples_path), config.data.label_style)
            else:
                self.examples[key] = prepare_data(config).clients[request.client_id]
        return self.examples[key]


def privatized(result: ClientResult, work: ClientRound, settings) -> ClientResult:
    """Under local differential privacy, the result with its update clipped and noised on the device."""
    if settings.mode != "local" or result.weight == 0:
        return result
    state = noised_locally(result.state, work.global_state, settings, noise_generator(settings, work.seed("local-dp")))
    return ClientResult(state, result.weight, result.metrics)


def run_client(update: ClientUpdate, context: ClientContext, work: ClientRound) -> ClientResult:
    """A client's round as the device runs it: its update (or, in simulation, what its attack makes of it), then
    local differential privacy where configured."""
    return privatized(behave(update, context, work), work, context.config.privacy)


def upload(result: ClientResult, global_state: dict[str, torch.Tensor], encoding: str) -> dict[str, torch.Tensor]:
    """The payload a client sends for its result (spearfl.federated.codec); none when its weight is 0."""
    return encode_upload(result.state, global_state, encoding) if result.weight > 0 else {}
