"""`personal.method: local`: each client trains alone on its own data, and sends nothing (no federation). The
global adapter stays the initial one; the personal adapter is the client's own, trained every round it is asked."""

from spearfl.personal.base import AdapterState, PersonalClient, PersonalMethod


class LocalOnly(PersonalMethod):
    keeps_personal = True
    federated = False

    def round_start(self, client: PersonalClient, global_state: AdapterState) -> AdapterState:
        return self.personal_of(client, global_state)

    def personal_after_round(self, client, global_state, trained, personal_pass):
        """What the round trained from the personal adapter (unchanged when it had nothing to learn from)."""
        return trained.state if trained.weight > 0 else self.personal_of(client, global_state)
