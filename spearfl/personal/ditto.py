"""`personal.method: ditto` (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, arXiv 2012.04221): the global update as FedAvg trains it, and beside it the personal
adapter v trained on the same round's data with the proximal term lambda/2 ||v - w||^2 towards the round's global
adapter w (`personal.ditto_lambda`). The term's gradient, lambda (v - w), is added to every step's gradient before
the clip and the step."""

from __future__ import annotations

import torch

from spearfl.algorithms.base import PersonalPass
from spearfl.lm.models import lora_parameters
from spearfl.personal.base import AdapterState, PersonalClient, PersonalMethod


class ProximalPull:
    """A step constraint adding lambda (v - w) to the gradient of every LoRA parameter v (w: the global adapter)."""

    def __init__(self, weight: float, anchor: AdapterState) -> None:
        self.weight, self.anchor, self.model = weight, anchor, None

    def bind(self, model) -> "ProximalPull":
        self.model = model
        return self

    def project_gradients(self) -> None:
        with torch.no_grad():
            for name, parameter in lora_parameters(self.model).items():
                pull = self.weight * (parameter - self.anchor[name].to(parameter.device, parameter.dtype))
                parameter.grad = pull if parameter.grad is None else parameter.grad + pull

    def project_parameters(self) -> None:
        pass


class Ditto(PersonalMethod):
    keeps_personal = True

    def personal_pass(self, client: PersonalClient, global_state: AdapterState) -> PersonalPass:
        pull = ProximalPull(self.settings.ditto_lambda, global_state)

        def start(context, trained):
            pull.bind(context.model)
            return self.personal_start(client, global_state)

        return PersonalPass(start, constraint=pull)
