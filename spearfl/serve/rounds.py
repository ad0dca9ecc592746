"""A device's side of the live loop: federated rounds that train SPEAR on the interactions its people judged.

The service answers the server's work orders like a client worker does (`POST /worker/train`, the same
safetensors payload as `spearfl client-worker`, so a Flower ClientApp can relay to it): the global adapter of
round r - 1 arrives, the service answers with it from then on, and the round trains on the pending interactions
that adapter version r - 1 - `live.max_staleness` or newer answered (older ones are skipped and counted). The
interactions a round trains on are claimed; they are consumed only when the server says the reply was accepted
(`POST /worker/result`, which also brings the new global adapter), and released for a later round when it was
not. Outcomes the service missed (it was down when the notice came) arrive with the next work order.
Training runs on the engine's thread between batches of answers, so nobody's request races it.

The work order carries only the training fields of the server's run (`spearfl.runtime.client.device_config`):
the interactions, the verifier, the limits and local DP are this device's own. Under local DP every release is
noised from the OS CSPRNG and written to the device's privacy ledger (beside its store) before it leaves, the
device refuses work orders once its own budget is spent, and each round is answered once.

Personalization is the device's own setting too (`personal`, spearfl.serve.personal): each round trains its
personal adapter beside the global update as the method does in simulation, and the device answers with it; the
server's notice that a federation stage has ended (the last round of a bounded run, every `personal.after_every`
rounds of an open-ended one) brings the global adapter that teaches the training after federation (`finetune`,
TAP's stage 2), on the answers its people judged.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from spearfl.algorithms.base import ClientContext, ClientResult, ClientRound
from spearfl.algorithms.spear import live_client_update
from spearfl.config import RunConfig
from spearfl.data.store import InteractionStore
from spearfl.errors import UserError
from spearfl.federated.codec import wire_array
from spearfl.lm.models import get_adapter_state, set_adapter_state
from spearfl.personal import METHODS, PersonalClient
from spearfl.runtime.client import Device, TrainRequest, device_config, run_personal_client, upload
from spearfl.serve.engine import AnswerEngine
from spearfl.serve.personal import VALIDATION_LIMIT, DevicePersonal, first_answer, held_for_validation, right_answer

LIVE_ALGORITHMS = ("spear",)


def changed(state: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> bool:
    """Whether training moved any tensor of the adapter."""
    return any(not torch.equal(tensor, before[name]) for name, tensor in state.items())


class DeviceRounds:
    """Runs the server's work orders on this device's store and engine."""

    def __init__(self, context: ClientContext, store: InteractionStore, engine: AnswerEngine, ledger_path=None,
                 personal_path=None):
        """`ledger_path`: where the device keeps its local DP releases; `personal_path`: its personal adapter (None:
        in memory). The model's adapter is the global one; the personal adapter, if the device has one, answers."""
        self.context, self.store, self.engine = context, store, engine
        self.device = Device(context.config, ledger_path=ledger_path)
        self.lock = threading.Lock()  # one round at a time
        own = context.config.personal
        self.method = METHODS[own.method](own)
        self.personal = DevicePersonal(personal_path, own.method)
        self.global_state = get_adapter_state(context.model)  # the newest global adapter this device has
        self.last_config = context.config  # the newest work order's config: the training after federation uses it
        engine.install(self.personal.answering(self.global_state), engine.adapter_version).result()

    def train_arrays(self, arrays: dict[str, np.ndarray], header: dict) -> tuple[dict[str, np.ndarray], dict]:
        """One work order in the client worker's wire format: (upload payload, {"weight", "metrics", "nonce"})."""
        request = TrainRequest(**header["request"])
        config = device_config(request.config, self.device.config)
        self.check_compatible(config)
        for round_index, accepted in header.get("settled", {}).items():
            self.settle(int(round_index), accepted)
        global_state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in arrays.items()}
        with self.lock:
            sent = self.device.check_new(request)
            if sent is not None:
                return sent
            self.device.check_budget(config)
            result = self.train(config, request, global_state)
            payload = upload(result, global_state, config.server.upload_encoding)
            reply = {name: wire_array(tensor) for name, tensor in payload.items()}, {"weight": result.weight, "metrics": result.metrics, "nonce": request.nonce}
            self.device.answered[request.client_id] = (request.round_index, request.nonce, reply)
        return reply

    def privacy(self) -> dict:
        """The device's local DP as its page shows it: settings, releases, epsilon spent, whether it is spent."""
        return self.device.ledger.view()

    def check_compatible(self, config: RunConfig) -> None:
        """The server's run must use this device's model and adapter shape, and an algorithm that learns live."""
        ours = self.context.config
        if config.model != ours.model or config.lora != ours.lora:
            raise UserError("the server's run names another model or LoRA shape than this device serves")
        if config.algorithm not in LIVE_ALGORITHMS:
            raise UserError(f"algorithm {config.algorithm!r} cannot learn from people's verdicts; live rounds run {LIVE_ALGORITHMS}")

    def train(self, config: RunConfig, request: TrainRequest, global_state: dict[str, torch.Tensor]) -> ClientResult:
        version = request.round_index - 1  # the global adapter of the previous round
        pending = [interaction for interaction in self.store.pending() if not self.validating(interaction.id)]
        oldest = version - config.live.max_staleness
        fresh = [interaction for interaction in pending if interaction.first.adapter_version >= oldest]
        # at most the prompts a simulated client would answer (the server bounds the weight by it); the rest wait
        fresh = fresh[: config.budget("spear").prompts_per_round]
        enough = len(fresh) >= config.live.min_interactions
        if enough:
            self.store.claim(request.round_index, [interaction.id for interaction in fresh])
        context = ClientContext(self.context.model, self.context.prompts, self.context.feedback, config, self.context.device)
        client = PersonalClient(request.client_id, [], self.validation_answers(), self.personal.state)

        def update(context: ClientContext, work: ClientRound) -> ClientResult:
            return live_client_update(context, work, fresh)

        def train_then_serve() -> ClientResult:
            result, personal, notes = run_personal_client(
                self.method, update, context, client, request.round_index, global_state, request.lr, self.device.ledger
            )
            if self.method.keeps_personal and personal is not None and changed(personal, client.personal or global_state):
                self.personal.update(personal, round=request.round_index, global_version=version, notes=notes)
            self.global_state, self.last_config = global_state, config
            set_adapter_state(self.context.model, self.personal.answering(global_state))  # answer with the newest
            self.engine.adapter_version = version
            return result

        try:
            result = self.engine.run_exclusive(train_then_serve).result()
        except BaseException:
            self.store.release(request.round_index)
            raise
        if result.weight == 0 or not enough:
            self.store.release(request.round_index)
        if config.privacy.mode != "local":  # under local DP the device releases no counters
            result.metrics |= {"stale_skipped": sum(i.first.adapter_version < oldest for i in pending), "pending": len(pending)}
        return result

    def validating(self, interaction_id: str) -> bool:
        """Whether the interaction is in the device's validation split (TAP's only; never trained on)."""
        return self.method.uses_validation and held_for_validation(interaction_id, self.context.config.personal.validation_fraction)

    def validation_answers(self, recent: list | None = None) -> list:
        """The right answers of the device's validation split, newest first (none unless the method reads them), among
        `recent` (the store's newest interactions, read here when not given)."""
        if not self.method.uses_validation:
            return []
        recent = self.store.recent(limit=10 * VALIDATION_LIMIT) if recent is None else recent
        held = [i for i in recent if self.validating(i.id)]
        return [answer for answer in map(right_answer, held) if answer is not None][:VALIDATION_LIMIT]

    def after_federation(self, round_index: int) -> None:
        """The method's training after federation on the people's judged answers (outside the validation split),
        taught by the global adapter now held; the personal adapter kept and answering."""
        recent = self.store.recent(limit=10 * VALIDATION_LIMIT)
        answers = [answer for answer in map(first_answer, (i for i in recent if not self.validating(i.id))) if answer is not None]
        config = self.last_config
        context = ClientContext(self.context.model, self.context.prompts, self.context.feedback, config, self.context.device)
        client = PersonalClient(0, [], self.validation_answers(recent), self.personal.state, judged=answers)

        def train_then_serve() -> None:
            if answers:
                personal, metrics = self.method.after_federation(context, client, self.global_state, round_index)
                if personal is not None and changed(personal, client.personal or self.global_state):
                    kept = ("loss", "optimizer_steps", "wins", "final_replaced", "final_gate")
                    self.personal.update(personal, round=round_index, global_version=round_index, after_federation=True,
                                         notes={key: value for key, value in metrics.items() if key in kept})
            set_adapter_state(self.context.model, self.personal.answering(self.global_state))

        self.engine.run_exclusive(train_then_serve).result()

    def reset_personal(self) -> None:
        """A person's reset: the personal adapter dropped, the global adapter answering."""
        def drop() -> None:
            self.personal.reset()
            set_adapter_state(self.context.model, self.global_state)

        with self.lock:
            self.engine.run_exclusive(drop).result()

    def personal_view(self) -> dict:
        return self.personal.view(self.engine.adapter_version)

    def settle(self, round_index: int, accepted: bool | None, state: dict[str, torch.Tensor] | None = None,
               version: int | None = None, ends_federation: bool = False) -> int:
        """The server's word on a round: its claims consumed (accepted) or released (rejected; None: this device
        was not in the round); a new global adapter installed (it answers unless a personal adapter does); where
        the round ends a federation stage, the training after federation. Returns how many it consumed."""
        consumed = 0
        if accepted is True:
            consumed = self.store.confirm(round_index)
        elif accepted is False:
            self.store.release(round_index)
        if state is not None:
            with self.lock:
                self.global_state = state
                self.engine.install(self.personal.answering(state), version).result()
                if ends_federation:
                    self.after_federation(round_index)
        return consumed
