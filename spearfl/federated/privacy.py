"""Client-level differential privacy: clipping and Gaussian noise at the server (central) or on the device (local),
with a Rényi-DP accountant from Google's dp-accounting library.

Central, DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", arXiv
1710.06963) with fixed-size client sampling: each of the K clients asked in a round has its update clipped to
norm C, and the server's update is (1/K) sum_k f_k clip(update_k, C) + N(0, (z C / K)^2 I). K is the number asked,
not the number that answered (a dropout or a weight-0 client adds a zero update), so the denominator reveals
nothing; f_k is 1, or less for a client the screening holds back (spearfl.federated.trust), never more. The
weighted mean by prompts is not used: its sensitivity would depend on the data. Between two federations that
differ in one client (replace-one, the number of clients public) the sum changes by at most 2C, so each round is
a Gaussian mechanism of noise multiplier z / 2 on a sample of K of the N clients drawn without replacement:
dp_accounting's SampledWithoutReplacementDpEvent (Wang, Balle and Kasiviswanathan 2019, AISTATS), composed once
per round in an RDP accountant.
Local: each client clips its update to C and adds N(0, (z C)^2 I) before sending, so the server need not be
trusted. Accounted per client as a Gaussian mechanism of multiplier z / 2 in every round (a device cannot verify
the server's sampling, so no amplification is counted; a client is assumed to take part in every round).

The run reports (epsilon, delta) after each round and plans its rounds so that epsilon never exceeds
`privacy.epsilon_budget`: a run stops cleanly after the last round the budget affords. Noise derives from the run
seed by default, so a resumed run repeats an uninterrupted one exactly; a deployment sets `noise_source: os`
(operating-system randomness, which nobody holding the config can predict, and no resume repeats).
Left out: adaptive clipping (Andrew et al. 2021), and per-example (record-level) DP inside a client's round.
"""

from __future__ import annotations

import os

import dp_accounting
import torch
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from spearfl.federated.robust import AdapterState, apply, clipped, unflatten, updates


def gaussian_like(state: AdapterState, std: float, generator: torch.Generator) -> AdapterState:
    """N(0, std^2) noise shaped like the state, drawn in the order of the tensors' names (not the dict's)."""
    return unflatten(torch.randn(sum(t.numel() for t in state.values()), generator=generator, dtype=torch.float64) * std, state)


def central_mean(
    global_state: AdapterState, states: list[AdapterState], factors: list[float], num_asked: int, settings, generator: torch.Generator
) -> tuple[AdapterState, dict]:
    """global + (1/K) sum_k f_k clip(update_k) + N(0, (z C / K)^2); K = `num_asked`, f_k in [0, 1]."""
    if any(not 0 <= factor <= 1 for factor in factors):
        raise ValueError(f"client factors must lie in [0, 1], got {factors}")
    total = {name: torch.zeros_like(tensor) for name, tensor in global_state.items()}
    num_clipped = 0
    for update, factor in zip(updates(global_state, states), factors):
        if factor == 0:
            continue
        bounded, was_clipped = clipped(update, settings.clip_norm)
        num_clipped += was_clipped
        total = {name: total[name] + factor * bounded[name] for name in total}
    noise = gaussian_like(global_state, settings.noise_multiplier * settings.clip_norm / num_asked, generator)
    mean = {name: total[name] / num_asked + noise[name] for name in total}
    return apply(global_state, mean), {"clipped": num_clipped, "asked": num_asked}


def noised_locally(state: AdapterState, global_state: AdapterState, settings, generator: torch.Generator) -> AdapterState:
    """What a device sends under local DP: global + clip(update, C) + N(0, (z C)^2)."""
    bounded, _ = clipped(updates(global_state, [state])[0], settings.clip_norm)
    noise = gaussian_like(bounded, settings.noise_multiplier * settings.clip_norm, generator)
    return apply(global_state, {name: bounded[name] + noise[name] for name in bounded})


def noise_generator(settings, seed: int) -> torch.Generator:
    """The noise's generator: from a seed derived from the run's (repeatable), or from the operating system."""
    if settings.noise_source == "os":
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return torch.Generator().manual_seed(seed)


def round_event(settings, num_clients: int, clients_per_round: int) -> dp_accounting.DpEvent:
    """One round's mechanism, as the accountant composes it."""
    gaussian = dp_accounting.GaussianDpEvent(settings.noise_multiplier / 2)  # sensitivity 2C under replace-one
    if settings.mode == "local":
        return gaussian
    return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, gaussian)


def epsilon_after(num_rounds: int, settings, num_clients: int, clients_per_round: int) -> float:
    """Client-level epsilon at `settings.delta` after `num_rounds` rounds (0 before any)."""
    if num_rounds == 0:
        return 0.0
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(round_event(settings, num_clients, clients_per_round), count=num_rounds)
    return float(accountant.get_epsilon(settings.delta))


def affordable_rounds(settings, num_clients: int, clients_per_round: int, limit: int) -> int:
    """The most rounds, up to `limit`, whose epsilon stays within the budget (epsilon grows with every round)."""
    if settings.epsilon_budget is None:
        return limit
    low, high = 0, limit  # epsilon_after is increasing: bisect for the last round within the budget
    while low < high:
        middle = (low + high + 1) // 2
        if epsilon_after(middle, settings, num_clients, clients_per_round) <= settings.epsilon_budget:
            low = middle
        else:
            high = middle - 1
    return low
