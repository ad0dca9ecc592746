"""A client device's long-lived side: the base model loaded once, the client's examples, one update per request.

The Flower ClientApp (in simulation) and the client worker (`spearfl client-worker`, in a deployment) hold
one `ClientHost` for the life of their process. Each request carries a work order; the host runs the very
client update the local runtime runs, so results carry over. The model is reloaded only when a request names
another model or LoRA shape.

A work order carries only what a round needs to train as the run does (`ORDER_FIELDS`: the model and LoRA
shape, the algorithm and its settings, the budget, the prompt and sampling, the seed, the upload encoding, and
local DP the server asks for). The device's data, feedback verifiers, privacy, attacks (in simulation),
evaluation and limits are its own config's: a work order that sets them is refused, and local DP is the
device's own floor (`spearfl.federated.privacy.local_settings`), accounted in its own ledger. A work order is
answered once: sent again with the same nonce it gets the same reply, with another nonce none.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spearfl.algorithms import ALGORITHMS, CONFIG_SECTIONS
from spearfl.algorithms.base import ClientContext, ClientResult, ClientRound, ClientUpdate
from spearfl.config import PrivacyConfig, RunConfig, config_to_dict, validate
from spearfl.data import load_jsonl
from spearfl.data.schema import Example
from spearfl.federated.codec import encode_upload, wire_array
from spearfl.errors import UserError
from spearfl.federated.privacy import PrivacyLedger, local_settings, noised_locally, public_reply
from spearfl.lm.models import load_base_model, quiet_library_output
from spearfl.data.split import split_each_client
from spearfl.personal import METHODS, PersonalClient, PersonalMethod
from spearfl.runtime.adversary import behave
from spearfl.runtime.setup import (
    attach_configured_lora,
    client_context,
    prepare_data,
    with_label_style,
)


# The run config's fields a work order carries: what a client round needs to train as the run does.
ORDER_FIELDS = ("seed", "algorithm", "model", "lora", "prompt", "generation", "optimizer", "client", "spear", "grpo", "opsd", "rltf_sd")


def work_order_config(config: RunConfig) -> dict:
    """What a server sends of its run config: `ORDER_FIELDS`, the upload encoding, and local DP if it asks for it."""
    tree = config_to_dict(config)
    order = {key: tree[key] for key in ORDER_FIELDS} | {"server": {"upload_encoding": config.server.upload_encoding}}
    if config.privacy.mode == "local":
        order["privacy"] = tree["privacy"]
    return order


def device_config(order: dict, own: RunConfig) -> RunConfig:
    """The config a device runs a work order with: its own, with the order's training fields; local DP its own
    floor, which the order may only tighten. UserError naming the fields when the order sets what is the device's."""
    if not isinstance(order, dict):
        raise UserError(f"the work order's config is a {type(order).__name__}, not an object")
    foreign = sorted(set(order) - set(ORDER_FIELDS) - {"server", "privacy"})
    foreign += [f"server.{name}" for name in sorted(set(order.get("server") or {}) - {"upload_encoding"})]
    if foreign:
        raise UserError(
            f"the work order sets {', '.join(foreign)}: a device's data, feedback verifiers, privacy, evaluation and limits "
            "are its own settings, and a work order carries only what a round trains with"
        )
    tree = config_to_dict(own)
    tree |= {key: order[key] for key in ORDER_FIELDS if key in order}
    if "upload_encoding" in (order.get("server") or {}):
        tree["server"]["upload_encoding"] = order["server"]["upload_encoding"]
    tree["privacy"] = config_to_dict(own)["privacy"]
    config = validate(tree, source="the work order with this device's own config")
    asked = validate({"privacy": order["privacy"]}, source="the work order's privacy").privacy if "privacy" in order else None
    applied = local_settings(own.privacy, asked)
    if applied is not None:
        config = config.model_copy(update={"privacy": applied.model_copy(update={
            "epsilon_budget": own.privacy.epsilon_budget, "delta": own.privacy.delta})})
    return config


@dataclass(frozen=True)
class TrainRequest:
    """One client round, as the server orders it."""

    config: dict  # the work order's part of the run config (`work_order_config`)
    client_id: int
    round_index: int
    lr: float
    nonce: str = ""  # the server's one-time token for this work order; the reply carries it back


@dataclass
class Device:
    """What is a device's own: its config (data, verifiers, privacy), its examples file, its privacy ledger, and
    the work orders it answered (client -> (round, nonce, reply)), so that none is answered twice."""

    config: RunConfig
    examples_path: str | None = None  # the device's own JSONL examples; None: its partition of its configured dataset
    ledger_path: str | Path | None = None  # where its local DP releases are kept; None: in memory (a simulation)
    answered: dict[int, tuple[int, str, tuple]] = field(default_factory=dict)
    ledger: PrivacyLedger | None = None

    def __post_init__(self) -> None:
        self.ledger = PrivacyLedger(self.ledger_path, self.config.privacy)

    def check_new(self, request: TrainRequest) -> tuple | None:
        """The reply already sent for this very work order, or None for a new one; UserError for a round answered
        under another nonce, or one older than the last answered (a re-sent order must not draw fresh noise over
        another update: the difference of two replies would cancel it)."""
        last = self.answered.get(request.client_id)
        released = {int(release["round"]) for release in self.ledger.releases}
        if last is not None and last[0] == request.round_index and last[1] == request.nonce and request.nonce:
            return last[2]
        if (last is not None and request.round_index <= last[0]) or request.round_index in released:
            raise UserError(f"round {request.round_index} was answered already (this device answers each round once)")
        return None

    def check_budget(self, config: RunConfig) -> None:
        """PrivacyBudgetSpent before any work when one more local DP release would pass the device's budget."""
        if config.privacy.mode == "local":
            self.ledger.check(config.privacy)

class ClientHost:
    """Holds the base model with LoRA and the client's examples across rounds; runs client updates.

    A client's personal adapter (its device's `personal.method`, spearfl.personal) is kept in `personal`, by client
    id: a client worker keeps it for the life of its process; a Flower ClientApp puts it there from its node's state
    before a round and takes it back after (spearfl.flower.client_app). Only the shared update leaves."""

    def __init__(self, device: Device | None = None) -> None:
        """`device`: this device's own settings; None for a simulation, where each call names them."""
        quiet_library_output()
        self.device = device
        self.model_key: tuple | None = None
        self.models_loaded = 0
        self.model = None
        self.tokenizer = None
        self.examples: dict[tuple, tuple[list[Example], list[Example]]] = {}  # a Flower simulation worker serves several clients
        self.devices: dict[tuple, Device] = {}  # the simulated devices of `device_for`
        self.personal: dict[int, dict[str, torch.Tensor]] = {}  # client id -> its personal adapter

    def train(self, request: TrainRequest, global_state: dict[str, torch.Tensor], device: Device) -> ClientResult:
        """Run the configured client update on this client's examples, from the given global adapter; under a
        personalization method, its personal adapter trained beside and kept (`personal`)."""
        config = device_config(request.config, device.config)
        context = self.context_for(config)
        examples, validation = self.examples_for(config, request.client_id, device.examples_path)
        method = METHODS[config.personal.method](config.personal)
        client = PersonalClient(request.client_id, examples, validation, self.personal.get(request.client_id))
        result, personal, _ = run_personal_client(
            method, ALGORITHMS[config.algorithm], context, client, request.round_index, global_state, request.lr, device.ledger
        )
        if personal is not None:
            self.personal[request.client_id] = personal
        return result

    def train_arrays(self, arrays: dict[str, np.ndarray], request: dict, device: Device | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """`train` with numpy in and out, for transports: (upload payload, {"weight", "metrics", "nonce"}).

        The payload is the configured upload encoding of the trained adapter (spearfl.federated.codec), as numpy
        arrays (bfloat16 as its bit patterns, uint16); it is empty when the weight is 0. `device`: the device's own
        settings (this host's, unless the call names them: a simulation's ClientApp serving several clients).
        """
        device = self.device or self.device_for(device, request.get("client_id"))
        if device is None:
            raise UserError("this client host has no device config of its own: start it with one (spearfl client-worker --config)")
        global_state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in arrays.items()}
        request = TrainRequest(**request)
        sent = device.check_new(request)
        if sent is not None:
            return sent
        config = device_config(request.config, device.config)
        device.check_budget(config)
        result = self.train(request, global_state, device)
        encoding = config.server.upload_encoding
        payload = upload(result, global_state, encoding)
        reply = {name: wire_array(tensor) for name, tensor in payload.items()}, {"weight": result.weight, "metrics": result.metrics, "nonce": request.nonce}
        device.answered[request.client_id] = (request.round_index, request.nonce, reply)
        return reply

    def device_for(self, spec, client_id) -> Device | None:
        """The device a simulation's ClientApp names for a request ({"config": its own config, "examples_path"}),
        kept per client so that its answered work orders and ledger last as the process does."""
        if spec is None:
            return None
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
            raise UserError("the device settings must be an object with the device's own config")
        key = (client_id, json.dumps(spec, sort_keys=True))
        if key not in self.devices:
            own = validate(spec["config"], source="the device's own config")
            self.devices[key] = Device(own, spec.get("examples_path"))
        return self.devices[key]

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

    def examples_for(self, config: RunConfig, client_id: int, examples_path: str | None) -> tuple[list[Example], list[Example]]:
        """(training pool, validation split) of the device: its own examples file, or its partition of the configured
        dataset (as the local runtime draws it, validation split included)."""
        key = (examples_path, client_id, config.seed, config.data.model_dump_json(), config.personal.model_dump_json())
        if key not in self.examples:
            if examples_path:
                own = [with_label_style(load_jsonl(examples_path), config.data.label_style)]
                validation = [[]]
                if config.personal.method == "tap":
                    own, validation = split_each_client(own, config.personal.validation_fraction, seed=config.seed + 1)
                self.examples[key] = (own[0], validation[0])
            else:
                federation = prepare_data(config)
                validation = federation.client_validation[client_id] if federation.client_validation else []
                self.examples[key] = (federation.clients[client_id], validation)
        return self.examples[key]


def privatized(result: ClientResult, work: ClientRound, config: RunConfig, ledger: PrivacyLedger | None = None) -> ClientResult:
    """Under local differential privacy, what the device releases: its update clipped and noised from the OS
    CSPRNG, even when it trained nothing (then noise alone, so that whether it had anything to learn from is not
    released either), with the public weight and counters of `public_reply`. The release is checked against the
    device's budget and written to its ledger before it leaves. Without local DP the result as it is."""
    settings = config.privacy
    if settings.mode != "local":
        return result
    if ledger is not None:
        ledger.check(settings)
    state = noised_locally(result.state, work.global_state, settings)
    weight, metrics = public_reply(result.metrics, config.budget(CONFIG_SECTIONS[config.algorithm]).prompts_per_round)
    if ledger is not None:
        ledger.record(work.round_index, settings)
    return ClientResult(state, weight, metrics)


def run_client(update: ClientUpdate, context: ClientContext, work: ClientRound, ledger: PrivacyLedger | None = None) -> ClientResult:
    """A client's round as the device runs it: its update (or, in simulation, what its attack makes of it), then
    local differential privacy where configured."""
    return privatized(behave(update, context, work), work, context.config, ledger)


def run_personal_client(
    method: PersonalMethod,
    update: ClientUpdate,
    context: ClientContext,
    client: PersonalClient,
    round_index: int,
    global_state: dict[str, torch.Tensor],
    lr: float,
    ledger: PrivacyLedger | None = None,
) -> tuple[ClientResult, dict[str, torch.Tensor] | None, dict]:
    """A client's round under a personalization method (spearfl.personal): (what it releases, its personal adapter
    after the round, notes of the personal pass). The release is `method.shared` of what it trained, under local
    DP noised against the global adapter; a method that does not federate (`local`) releases weight 0 and the
    global adapter, that is nothing of its own."""
    personal_pass = method.personal_pass(client, global_state)
    start = method.round_start(client, global_state)
    work = ClientRound(client.client_id, round_index, client.examples, start, lr, context.config.seed, personal=personal_pass)
    trained = behave(update, context, work)
    personal = method.personal_after_round(client, global_state, trained, personal_pass) if method.keeps_personal else None
    notes = {} if personal_pass is None else personal_pass.notes | {f"personal_{key}": value for key, value in personal_pass.metrics.items()
                                                                   if key in ("loss", "optimizer_steps")}
    if not method.federated:
        return ClientResult(global_state, 0.0, trained.metrics), personal, notes
    sent = method.shared(trained.state, global_state) if trained.weight > 0 else global_state
    released = privatized(ClientResult(sent, trained.weight, trained.metrics), dataclasses.replace(work, global_state=global_state, personal=None), context.config, ledger)
    return released, personal, notes


def upload(result: ClientResult, global_state: dict[str, torch.Tensor], encoding: str) -> dict[str, torch.Tensor]:
    """The payload a client sends for its result (spearfl.federated.codec); none when its weight is 0."""
    return encode_upload(result.state, global_state, encoding) if result.weight > 0 else {}
