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
`privacy.epsilon_budget`: a run stops cleanly after the last round the budget affords.

Randomness. Every draw a guarantee rests on comes from the operating system's CSPRNG (os.urandom), never from
the run seed, which is in the config every device receives: the noise (central and local), and, under central
DP, the choice of each round's clients, which must be the uniform sample the accountant's event assumes. So a
run with DP does not repeat bit for bit, and a resumed one draws afresh; runs without DP stay reproducible.
The Gaussian values are drawn by the Box-Muller transform from 53-bit uniforms in float64. Left out: the
floating-point attacks on sampled noise (Mironov 2012; Jin et al. 2022, "Are We There Yet? Timing and
Floating-Point Attacks on Differential Privacy Systems", arXiv 2112.05307), which a discrete or snapped
Gaussian would close.

Under local DP the device, not the server, decides: its own settings are a floor a work order can raise (more
noise, a tighter clip) and never lower (`local_settings`); it accounts every release itself, keeps the ledger
beside its data and refuses to release past its own budget (`PrivacyLedger`); and what it releases beside the
noised update is public: the weight is the prompts asked for and the counters are not sent (`public_reply`).
Under central DP the server's history keeps only what is derived from the noised mean (`released_row`).
Left out: adaptive clipping (Andrew et al. 2021), and per-example (record-level) DP inside a client's round.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import dp_accounting
import numpy as np
import torch
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from spearfl.errors import UserError
from spearfl.federated.robust import AdapterState, apply, clipped, unflatten, updates
from spearfl.io import atomic_write_json, read_json


def os_normal(count: int) -> torch.Tensor:
    """`count` standard normal values from the operating system's CSPRNG (Box-Muller on 53-bit uniforms).  # [count]"""
    pairs = (count + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs) >> np.uint64(11)
    radius = np.sqrt(-2.0 * np.log((bits[0] + 1.0) * 2.0**-53))  # uniform on (0, 1]: the logarithm stays finite
    angle = 2.0 * math.pi * bits[1] * 2.0**-53
    return torch.from_numpy(np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count])


def gaussian_like(state: AdapterState, std: float) -> AdapterState:
    """N(0, std^2) noise from the OS CSPRNG, shaped like the state."""
    return unflatten(os_normal(sum(t.numel() for t in state.values())) * std, state)


def central_mean(
    global_state: AdapterState, states: list[AdapterState], factors: list[float], num_asked: int, settings
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
    noise = gaussian_like(global_state, settings.noise_multiplier * settings.clip_norm / num_asked)
    mean = {name: total[name] / num_asked + noise[name] for name in total}
    return apply(global_state, mean), {"clipped": num_clipped, "asked": num_asked}


def noised_locally(state: AdapterState, global_state: AdapterState, settings) -> AdapterState:
    """What a device sends under local DP: global + clip(update, C) + N(0, (z C)^2)."""
    bounded, _ = clipped(updates(global_state, [state])[0], settings.clip_norm)
    noise = gaussian_like(bounded, settings.noise_multiplier * settings.clip_norm)
    return apply(global_state, {name: bounded[name] + noise[name] for name in bounded})


def local_settings(own, ordered):
    """The local DP a device applies: its own settings, which a work order may tighten (a larger z, a smaller C) but
    never loosen; local DP a work order asks of a device that has none is applied too. None: no local DP."""
    mine, asked = (settings if settings is not None and settings.mode == "local" else None for settings in (own, ordered))
    if mine is None or asked is None:
        return mine or asked
    return mine.model_copy(update={
        "noise_multiplier": max(mine.noise_multiplier, asked.noise_multiplier), "clip_norm": min(mine.clip_norm, asked.clip_norm),
    })


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


def local_epsilon(multipliers: list[float], delta: float) -> float:
    """A device's epsilon at `delta` after releases under these noise multipliers (each a Gaussian mechanism of
    multiplier z / 2: replacing the device's data moves its clipped update by up to 2C)."""
    if not multipliers:
        return 0.0
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    for multiplier in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(multiplier / 2))
    return float(accountant.get_epsilon(delta))


class PrivacyBudgetSpent(UserError):
    """A release would take the device past its own epsilon budget: it does not answer."""


class PrivacyLedger:
    """Every release a device made under local DP, accounted on the device: kept in `path` (JSON, written
    atomically, readable by its owner only) so that a restart, or a work order, never resets it."""

    def __init__(self, path: str | os.PathLike | None, settings):
        self.path, self.settings = (Path(path) if path is not None else None), settings
        self.releases: list[dict] = []  # {"round", "noise_multiplier", "clip_norm", "time"}
        if self.path is not None and self.path.exists():
            saved = read_json(self.path)
            if not isinstance(saved, dict) or not isinstance(saved.get("releases"), list):
                raise UserError(f"{self.path}: not a privacy ledger (an object with a list of releases)")
            self.releases = saved["releases"]

    def epsilon(self, next_multiplier: float | None = None) -> float:
        """Epsilon spent so far (at the device's delta), or after one more release at `next_multiplier`."""
        multipliers = [float(release["noise_multiplier"]) for release in self.releases]
        return local_epsilon(multipliers + ([next_multiplier] if next_multiplier is not None else []), self.settings.delta)

    def check(self, settings) -> None:
        """PrivacyBudgetSpent if one more release with these settings would pass the device's budget."""
        budget = self.settings.epsilon_budget
        if budget is not None and self.epsilon(settings.noise_multiplier) > budget:
            raise PrivacyBudgetSpent(
                f"this device's privacy budget (epsilon {budget:g} at delta {self.settings.delta:g}) is spent: "
                f"{len(self.releases)} releases took epsilon {self.epsilon():.4g}, and one more would pass it"
            )

    def record(self, round_index: int, settings) -> None:
        """Note a release and persist the ledger before the release leaves the device."""
        self.releases.append({"round": round_index, "noise_multiplier": settings.noise_multiplier,
                              "clip_norm": settings.clip_norm, "time": time.time()})
        if self.path is not None:
            atomic_write_json(self.path, {"delta": self.settings.delta, "releases": self.releases})
            os.chmod(self.path, 0o600)

    def view(self) -> dict:
        """What the device's page shows: its settings, releases and epsilon spent."""
        settings = self.settings
        return {
            "mode": settings.mode, "clip_norm": settings.clip_norm, "noise_multiplier": settings.noise_multiplier,
            "delta": settings.delta, "epsilon_budget": settings.epsilon_budget, "releases": len(self.releases),
            "epsilon": self.epsilon(), "spent": settings.epsilon_budget is not None and self.epsilon(settings.noise_multiplier) > settings.epsilon_budget,
        }


def public_reply(metrics: dict, asked: int) -> tuple[float, dict]:
    """(weight, metrics) a device releases beside a locally noised update: the prompts asked for as its weight,
    and every counter zero. The counters (right answers, tokens, seconds) and the prompts trained on would
    travel un-noised; the server learns that the device took part, and nothing else."""
    return float(asked), {key: 0 for key in metrics if isinstance(metrics[key], (int, float))} | {"prompts": asked}


# History fields that are functions of the noised mean (or public) alone, kept under central DP; everything else
# reads single updates or their clear metrics, and is left out.
RELEASED_UNDER_CENTRAL_DP = ("round", "lr", "clients", "privacy", "eval", "rejected", "server_seconds", "aggregation")


def released_row(row: dict) -> dict:
    """A round's history row as a central-DP run may publish it: the clients asked (ids), the accountant, the
    held-out evaluation of the noised adapter, the replies dropped; no per-client metrics or weights, no
    screening, no LoRA averaging error, no count of clipped updates."""
    kept = {key: value for key, value in row.items() if key in RELEASED_UNDER_CENTRAL_DP}
    if "clients" in kept:
        kept["clients"] = [{"client": entry["client"]} for entry in kept["clients"]]
    if "aggregation" in kept:
        kept["aggregation"] = {"asked": kept["aggregation"].get("asked")}
    if "rejected" in kept:
        kept["rejected"] = [{"client": entry["client"], "reason": "dropped"} for entry in kept["rejected"]]
    kept["withheld"] = "per-client metrics, weights and update statistics: they are not differentially private"
    return kept
