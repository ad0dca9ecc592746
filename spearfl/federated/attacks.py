"""Model-poisoning attacks: what a malicious client sends in place of its honest update, as pure functions.

Every attack maps (the update the client trained, with poisoned feedback where its behaviour says so; what the
attacker knows, `AttackerView`; settings; a generator) to the update it sends. What it knows is what a device
can know: its own honest update (it has honest data of its own and trains on it: its only estimate of what
benign clients send; it never sees other clients' updates), the global adapters the server sent it (so the last
global update), its own weight and the round's size from the config it receives.

- sign_flip: -scale x the update (Damaskinos et al. 2018 call it a reversed-gradient attack).
- scaling: scale x the update, a hand-set factor.
- model_replacement: gamma x the update with gamma = the round's total weight / the attacker's own, so that
  FedAvg's weighted mean becomes the attacker's model (Bagdasaryan et al. 2020, "How To Backdoor Federated
  Learning", arXiv 1807.00459: gamma = n / eta, n clients of equal weight and server rate eta = 1).
- gaussian: noise with the norm of scale x the honest update, no learning in it (Fang et al. 2020).
- free_rider: the global adapter sent back unchanged (an update of zero) while weight is claimed.
- disguised_free_rider: the last global update plus Gaussian noise of `noise` x its norm, without training
  (Fraboni, Vidal and Lorenzi 2021, "Free-rider Attacks on Model Aggregation in Federated Learning", AISTATS,
  arXiv 2006.11901: free-riders disguised by stochastic perturbations; the last global update as the update is
  the "delta weights" attack of Lin et al. 2019, arXiv 1911.12560). With no global update known yet (its first
  round) the noise has nothing to scale by and it sends zero, a plain free-rider.
The constrained attacks the two-stage scheme's paper tests against, each wrapped around the poisoned update:
- bounded_scaling: the update scaled to exactly `bound` x the honest norm, as large as a norm bound allows.
- euclidean: the update pulled within `bound` x the honest norm of the honest update (Wang et al. 2020, "Attack of
  the Tails", arXiv 2007.05084, projected gradient descent onto a ball around the benign model).
- cosine: the update mixed with the honest one until its cosine to it reaches `cosine`, at the poisoned norm.
Neurotoxin (Zhang et al. 2022, "Neurotoxin: Durable Backdoors in Federated Learning", arXiv 2206.10341) acts on
every local step, not on the final update: `neurotoxin_mask` and `projected` are its two operations, which
spearfl.runtime.adversary applies around each optimizer step of the poisoned training.
Sybil clones' own noise (`perturbed`) is added after any of these.
Left out: attacks that need other clients' updates (LIE, min-max), which a device cannot see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spearfl.federated.robust import AdapterState, flatten, unflatten

TINY = 1e-12


@dataclass(frozen=True)
class AttackerView:
    """What a malicious device knows when it crafts its update."""

    honest: AdapterState  # its own honestly trained update
    global_step: AdapterState | None = None  # the last global update it saw (None before it saw two adapters)
    own_weight: float = 1.0  # the weight it claims
    round_weight: float = 1.0  # its estimate of the round's total weight, its own included


def sign_flip(poisoned, known, settings, generator) -> AdapterState:
    return {name: -settings.scale * tensor for name, tensor in poisoned.items()}


def scaling(poisoned, known, settings, generator) -> AdapterState:
    return {name: settings.scale * tensor for name, tensor in poisoned.items()}


def model_replacement(poisoned, known, settings, generator) -> AdapterState:
    """gamma x the update, gamma = round weight / own weight: the weighted mean then lands on the poisoned model
    when the other updates are near zero (Bagdasaryan et al.'s assumption of a converged global model)."""
    gamma = known.round_weight / known.own_weight
    return {name: gamma * tensor for name, tensor in poisoned.items()}


def noise_like(reference: AdapterState, norm: float, generator) -> AdapterState:
    """Isotropic Gaussian noise over `reference`'s values, scaled to `norm`."""
    vector = torch.randn(flatten(reference).numel(), generator=generator, dtype=torch.float64)
    return unflatten(vector * norm / max(float(vector.norm()), TINY), reference)


def gaussian(poisoned, known, settings, generator) -> AdapterState:
    return noise_like(known.honest, settings.scale * float(flatten(known.honest).double().norm()), generator)


def free_rider(poisoned, known, settings, generator) -> AdapterState:
    return {name: torch.zeros_like(tensor) for name, tensor in poisoned.items()}


def disguised_free_rider(poisoned, known, settings, generator) -> AdapterState:
    """The last global update + noise of `settings.noise` x its norm; zero while no global update is known."""
    if known.global_step is None:
        return free_rider(poisoned, known, settings, generator)
    step = {name: known.global_step[name].double() for name in poisoned}
    noise = noise_like(step, settings.noise * float(flatten(step).norm()), generator)
    return {name: (step[name] + noise[name]).to(poisoned[name].dtype) for name in poisoned}


def bounded_scaling(poisoned, known, settings, generator) -> AdapterState:
    ratio = settings.bound * float(flatten(known.honest).norm()) / max(float(flatten(poisoned).norm()), TINY)
    return {name: ratio * tensor for name, tensor in poisoned.items()}


def euclidean(poisoned, known, settings, generator) -> AdapterState:
    reference, vector = flatten(known.honest).double(), flatten(poisoned).double()
    radius = settings.bound * float(reference.norm())
    offset = vector - reference
    return unflatten(reference + offset * min(1.0, radius / max(float(offset.norm()), TINY)), poisoned)


def cosine(poisoned, known, settings, generator) -> AdapterState:
    """The poisoned direction turned towards the honest one until cos >= settings.cosine, at the poisoned norm."""
    vector, reference = flatten(poisoned).double(), flatten(known.honest).double()
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


def neurotoxin_mask(benign: AdapterState, mask_fraction: float) -> AdapterState:
    """1 on the coordinates Neurotoxin may move, 0 on the `mask_fraction` of them where `benign` is largest in
    magnitude (the paper's top-k% of the last global update, taken over all tensors at once).  # state -> state"""
    magnitude = flatten(benign).abs()  # [P]
    keep = torch.ones(magnitude.numel(), dtype=torch.float32)
    num_masked = math.ceil(mask_fraction * magnitude.numel())
    if num_masked:
        keep[magnitude.topk(num_masked).indices] = 0.0
    return unflatten(keep, {name: tensor.float() for name, tensor in benign.items()})


def projected(update: AdapterState, mask: AdapterState, radius: float) -> AdapterState:
    """Neurotoxin's projection of an update: zero off the mask, then into the L2 ball of `radius` (its PGD step).

    Computed in float64; the caller casts. # state -> state"""
    masked = {name: tensor.double() * mask[name].double() for name, tensor in update.items()}
    norm = float(flatten(masked).norm())
    factor = min(1.0, radius / norm) if norm > 0 else 1.0
    return {name: tensor * factor for name, tensor in masked.items()}


def perturbed(update: AdapterState, share: float, generator) -> AdapterState:
    """A Sybil clone's copy of the update with its own Gaussian noise of `share` x the update's norm."""
    noise = noise_like(update, share * float(flatten(update).double().norm()), generator)
    return {name: (tensor.double() + noise[name].double()).to(tensor.dtype) for name, tensor in update.items()}


# (poisoned update, AttackerView, settings, torch.Generator) -> the update sent
UPDATE_ATTACKS = {
    "sign_flip": sign_flip,
    "scaling": scaling,
    "model_replacement": model_replacement,
    "gaussian": gaussian,
    "free_rider": free_rider,
    "disguised_free_rider": disguised_free_rider,
    "bounded_scaling": bounded_scaling,
    "euclidean": euclidean,
    "cosine": cosine,
}
