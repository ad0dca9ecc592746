"""Model-poisoning attacks: what a malicious client sends in place of its honest update, as pure functions.

Every attack maps (the update the client trained, with poisoned feedback where its behaviour says so; the honest
update it would have sent; settings; a generator) to the update it sends. The honest update is the attacker's
own estimate of what benign clients send: it has honest data of its own and trains on it, which is all a real
device can know (it never sees other clients' updates).

- sign_flip: -scale x the update (Damaskinos et al. 2018 call it a reversed-gradient attack).
- scaling: scale x the update; with scale = the number of clients a round, model replacement (Bagdasaryan et al.
  2020, "How To Backdoor Federated Learning", arXiv 1807.00459).
- gaussian: noise with the norm of scale x the honest update, no learning in it (Fang et al. 2020).
- free_rider: the global adapter sent back unchanged (an update of zero) while full weight is claimed.
The constrained attacks the two-stage scheme's paper tests against, each wrapped around the poisoned update:
- bounded_scaling: the update scaled to exactly `bound` x the honest norm, as large as a norm bound allows.
- euclidean: the update pulled within `bound` x the honest norm of the honest update (Wang et al. 2020, "Attack of
  the Tails", arXiv 2007.05084, projected gradient descent onto a ball around the benign model).
- cosine: the update mixed with the honest one until its cosine to it reaches `cosine`, at the poisoned norm.
- neurotoxin: the update kept only on the coordinates where the honest update is smallest, the largest
  `mask_fraction` of them zeroed (Zhang et al. 2022, "Neurotoxin: Durable Backdoors in Federated Learning",
  arXiv 2206.10341; the paper masks by the previous global update, which the attacker approximates by its own).
Left out: attacks that need other clients' updates (LIE, min-max), which a device cannot see.
"""

from __future__ import annotations

import math

import torch

from spearfl.federated.robust import AdapterState, flatten, unflatten

TINY = 1e-12


def sign_flip(poisoned, honest, settings, generator) -> AdapterState:
    return {name: -settings.scale * tensor for name, tensor in poisoned.items()}


def scaling(poisoned, honest, settings, generator) -> AdapterState:
    return {name: settings.scale * tensor for name, tensor in poisoned.items()}


def gaussian(poisoned, honest, settings, generator) -> AdapterState:
    vector = torch.randn(flatten(honest).numel(), generator=generator, dtype=torch.float64)
    vector *= settings.scale * float(flatten(honest).norm()) / max(float(vector.norm()), TINY)
    return unflatten(vector, honest)


def free_rider(poisoned, honest, settings, generator) -> AdapterState:
    return {name: torch.zeros_like(tensor) for name, tensor in poisoned.items()}


def bounded_scaling(poisoned, honest, settings, generator) -> AdapterState:
    ratio = settings.bound * float(flatten(honest).norm()) / max(float(flatten(poisoned).norm()), TINY)
    return {name: ratio * tensor for name, tensor in poisoned.items()}


def euclidean(poisoned, honest, settings, generator) -> AdapterState:
    reference, vector = flatten(honest).double(), flatten(poisoned).double()
    radius = settings.bound * float(reference.norm())
    offset = vector - reference
    return unflatten(reference + offset * min(1.0, radius / max(float(offset.norm()), TINY)), poisoned)


def cosine(poisoned, honest, settings, generator) -> AdapterState:
    """The poisoned direction turned towards the honest one until cos >= settings.cosine, at the poisoned norm."""
    vector, reference = flatten(poisoned).double(), flatten(honest).double()
    norm = float(vector.norm())
    target, unit = reference / max(float(reference.norm()), TINY), vector / max(norm, TINY)
    low, high = 0.0, 1.0  # the share of the honest direction; bisection on a monotone cosine
    for _ in range(40):
        share = (low + high) / 2
        mixed = (1 - share) * unit + share * target
        if float(mixed @ target) / max(float(mixed.norm()), TINY) >= settings.cosine:
            high = share
        else:
            low = share
    mixed = (1 - high) * unit + high * target
    return unflatten(mixed * norm / max(float(mixed.norm()), TINY), poisoned)


def neurotoxin(poisoned, honest, settings, generator) -> AdapterState:
    vector, magnitude = flatten(poisoned).double(), flatten(honest).abs()
    num_masked = math.ceil(settings.mask_fraction * magnitude.numel())
    masked = magnitude.topk(num_masked).indices if num_masked else torch.tensor([], dtype=torch.long)
    vector[masked] = 0.0
    return unflatten(vector, poisoned)


# (poisoned update, honest update, settings, torch.Generator) -> the update sent
UPDATE_ATTACKS = {
    "sign_flip": sign_flip,
    "scaling": scaling,
    "gaussian": gaussian,
    "free_rider": free_rider,
    "bounded_scaling": bounded_scaling,
    "euclidean": euclidean,
    "cosine": cosine,
    "neurotoxin": neurotoxin,
}
