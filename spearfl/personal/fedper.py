"""`personal.method: fedper` (Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
Layers", 2019, arXiv 1912.00818): the LoRA modules of the top `personal.fedper_local_layers` decoder layers are the
client's own, the rest shared. A round starts from the global shared modules and the client's own personal ones,
trains them all, and sends the shared ones: the personal modules go back as the global adapter had them, so the
server learns nothing of them and the global adapter's copies stay where they started."""

from __future__ import annotations

from spearfl.personal.base import AdapterState, PersonalClient, PersonalMethod, layer_of, with_modules


class FedPer(PersonalMethod):
    keeps_personal = True

    def local_names(self, state: AdapterState) -> list[str]:
        layers = sorted({layer for layer in map(layer_of, state) if layer is not None})
        top = set(layers[-self.settings.fedper_local_layers :])
        return [name for name in state if layer_of(name) in top]

    def round_start(self, client: PersonalClient, global_state: AdapterState) -> AdapterState:
        return with_modules(global_state, self.personal_of(client, global_state), self.local_names(global_state))

    def personal_after_round(self, client, global_state, trained, personal_pass):
        """The trained adapter whole: the shared modules as this client left them, its own personal ones."""
        return trained.state if trained.weight > 0 else self.round_start(client, global_state)

    def shared(self, trained: AdapterState, global_state: AdapterState) -> AdapterState:
        return with_modules(trained, global_state, self.local_names(global_state))
