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
from spearfl.lm.models import set_adapter_state
from spearfl.runtime.client import Device, TrainRequest, device_config, privatized, upload
from spearfl.serve.engine import AnswerEngine

LIVE_ALGORITHMS = ("spear",)


class DeviceRounds:
    """Runs the server's work orders on this device's store and engine."""

    def __init__(self, context: ClientContext, store: InteractionStore, engine: AnswerEngine, ledger_path=None):
        """`ledger_path`: where the device keeps its local DP releases (None: in memory)."""
        self.context, self.store, self.engine = context, store, engine
        self.device = Device(context.config, ledger_path=ledger_path)
        self.lock = threading.Lock()  # one round at a time

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
        pending = self.store.pending()
        oldest = version - config.live.max_staleness
        fresh = [interaction for interaction in pending if interaction.first.adapter_version >= oldest]
        # at most the prompts a simulated client would answer (the server bounds the weight by it); the rest wait
        fresh = fresh[: config.budget("spear").prompts_per_round]
        enough = len(fresh) >= config.live.min_interactions
        if enough:
            self.store.claim(request.round_index, [interaction.id for interaction in fresh])
        context = ClientContext(self.context.model, self.context.prompts, self.context.feedback, config, self.context.device)
        work = ClientRound(request.client_id, request.round_index, [], global_state, request.lr, config.seed)

        def train_then_serve() -> ClientResult:
            result = privatized(live_client_update(context, work, fresh), work, config, self.device.ledger)
            set_adapter_state(self.context.model, global_state)  # answer with the newest global adapter
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

    def settle(self, round_index: int, accepted: bool | None, state: dict[str, torch.Tensor] | None = None,
               version: int | None = None) -> int:
        """The server's word on a round: its claims consumed (accepted) or released (rejected; None: this device
        was not in the round); a new global adapter installed. Returns how many interactions it consumed."""
        consumed = 0
        if accepted is True:
            consumed = self.store.confirm(round_index)
        elif accepted is False:
            self.store.release(round_index)
        if state is not None:
            self.engine.install(state, version).result()
        return consumed
