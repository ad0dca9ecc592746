"""The attack bench's replay: recorded honest client updates of a finished run, a share of them turned malicious,
through each defense, round after round; detection figures for many combinations in minutes.

A run with `server.keep_client_updates: true` keeps, per round, the global adapter it sent and every adapter it
received (clients/round_0003/...). For each attack, share of malicious clients and defense, every recorded round
replays: the first ceil(share x K) clients of a round (in a seeded order) send the attack of their own recorded
update instead of it, the defense screens and combines, and the bench counts
- detection: a malicious client's reply flagged (screened as suspicious or malicious, left out by multi-Krum,
  clipped by norm clipping) is a true positive, an honest one flagged a false positive; the coordinate-wise
  median and trimmed mean flag nobody (n/a);
- rounds until detection: the first round in which each malicious client is flagged, counted from the first
  round it attacked, averaged over the malicious clients ever flagged;
- the damage: ||aggregate with the attack - aggregate of the honest updates|| / ||aggregate of the honest updates
  - global||, the relative distortion of the round's step (0: none; 1: as large as the step itself);
- server seconds per round of the screening and combination.
Every recorded client claims weight 1, so model replacement's gamma is the round's client count. The last global
update (this round's recorded global adapter - the previous round's) is what a disguised free-rider sends with
its noise and what the screening's novelty indicator measures against; the first recorded round has none. It is
the honest federation's step, as the attackers would see it where the defense keeps them out.
Replay covers the attacks on updates alone (sign flip, model replacement, Gaussian noise, free-riding plain and
disguised, Sybil clones of a sign flip, exact or each with its own noise); attacks that need poisoned training
(flipped verdicts, backdoors, DBA, Neurotoxin and the constrained attacks) need end-to-end runs, and clean accuracy
and attack success come from those only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from spearfl.config import DefenseConfig
from spearfl.federated.attacks import UPDATE_ATTACKS, AttackerView, perturbed
from spearfl.federated.robust import COMBINERS, apply, flatten, updates
from spearfl.federated.trust import SCREENINGS
from spearfl.io import load_tensors

REPLAY_ATTACKS = ("sign_flip", "model_replacement", "gaussian", "free_rider", "disguised_free_rider", "sybil", "sybil_perturbed")
# the attack config's defaults; perturbed Sybils add noise of half their update's norm (clones then at cosine 0.8)
ATTACK_SETTINGS = {"scale": 1.0, "bound": 1.0, "cosine": 0.9, "mask_fraction": 0.05, "noise": 1.0, "sybil_noise": 0.5}


@dataclass(frozen=True)
class RecordedRound:
    round_index: int
    global_state: dict[str, torch.Tensor]
    clients: list[int]
    states: list[dict[str, torch.Tensor]]


def recorded_rounds(folder: Path) -> list[RecordedRound]:
    """The rounds a run kept (`server.keep_client_updates`), in order; a UserError-worthy ValueError if none."""
    rounds = []
    for directory in sorted((Path(folder) / "clients").glob("round_*")):
        files = sorted(directory.glob("client_*.safetensors"), key=lambda path: int(path.stem.split("_")[1]))
        if files and (directory / "global.safetensors").exists():
            clients = [int(path.stem.split("_")[1]) for path in files]
            rounds.append(RecordedRound(int(directory.name.split("_")[1]), load_tensors(directory / "global.safetensors"),
                                        clients, [load_tensors(path) for path in files]))
    if not rounds:
        raise ValueError(f"{folder} kept no client updates: run it with --set server.keep_client_updates=true")
    return rounds


def malicious_update(attack: str, honest: dict, generator: torch.Generator, num_clients: int, global_step: dict | None) -> dict:
    """What a malicious client sends instead of its honest update; Sybil clones send one sign flip together."""
    kind = "sign_flip" if attack.startswith("sybil") else attack
    known = AttackerView(honest, global_step, own_weight=1.0, round_weight=float(num_clients))
    return UPDATE_ATTACKS[kind](honest, known, SimpleNamespace(**ATTACK_SETTINGS), generator)


def last_steps(rounds: list[RecordedRound]) -> list[dict | None]:
    """Per recorded round, its global adapter - the previous round's, None where that round was not recorded."""
    steps = [None]
    for previous, current in zip(rounds, rounds[1:]):
        consecutive = current.round_index == previous.round_index + 1
        steps.append(updates(previous.global_state, [current.global_state])[0] if consecutive else None)
    return steps


def flagged_clients(screening, notes: dict, kept: list[int], combiner: str) -> set[int] | None:
    """Indices the defense flagged this round; None when it flags nobody by design (median, trimmed mean)."""
    if screening.records:
        return {index for index, record in zip(kept, screening.records) if record["category"] != "trusted"}
    if combiner == "multi_krum":
        return set(kept) - set(notes.get("selected", kept))
    if combiner == "norm_clip":
        return set(notes.get("clipped", []))
    return None


def replay(rounds: list[RecordedRound], attack: str, share: float, defense: DefenseConfig, seed: int = 0) -> dict:
    """One attack x share x defense over the recorded rounds; the figures the module docstring names."""
    screen, combine = SCREENINGS[defense.screening], COMBINERS[defense.aggregator]
    reputation: dict[str, float] = {}
    true_positive = false_positive = malicious_total = honest_total = 0
    detected_at: dict[int, int] = {}
    damages, seconds, flags_known = [], [], True
    first_attacked = None
    everyone = sorted({client for replayed in rounds for client in replayed.clients})
    # the same clients stay malicious throughout, as devices would: a share of every client the run heard from
    chosen = np.random.default_rng(seed).permutation(everyone)[: math.ceil(share * len(everyone))] if share > 0 else []
    malicious_ids = {int(client) for client in chosen}
    for replayed, global_step in zip(rounds, last_steps(rounds)):
        clients, num = replayed.clients, len(replayed.clients)
        honest_updates = updates(replayed.global_state, replayed.states)
        generator = torch.Generator().manual_seed(seed * 100_003 + replayed.round_index)
        sybil = None
        states = []
        # a disguised free-rider has nothing to disguise itself with before it has seen a global update: it waits
        attacking = malicious_ids if attack != "disguised_free_rider" or global_step is not None else set()
        first_attacked = first_attacked or (replayed.round_index if attacking else None)
        for client, state, update in zip(clients, replayed.states, honest_updates):
            if client not in attacking:
                states.append(state)
                continue
            if attack.startswith("sybil"):
                sybil = sybil or malicious_update(attack, update, generator, num, global_step)
                sent = perturbed(sybil, ATTACK_SETTINGS["sybil_noise"], generator) if attack == "sybil_perturbed" else sybil
                states.append(apply(replayed.global_state, sent))
            else:
                states.append(apply(replayed.global_state, malicious_update(attack, update, generator, num, global_step)))
        weights = [1.0] * num
        metrics = [{} for _ in clients]
        started = time.perf_counter()
        screening = screen(replayed.global_state, states, weights, clients, metrics, reputation, defense, global_step)
        combined, notes = combine(replayed.global_state, screening.states, screening.weights, defense)
        seconds.append(time.perf_counter() - started)
        reputation = screening.reputation
        clean, _ = COMBINERS["mean"](replayed.global_state, replayed.states, weights, defense)
        step = float(flatten(updates(replayed.global_state, [clean])[0]).double().norm())
        if combined is not None and step > 0:
            damages.append(float(flatten(updates(clean, [combined])[0]).double().norm()) / step)
        flagged = flagged_clients(screening, notes, list(range(num)), defense.aggregator)
        if flagged is None:
            flags_known = False
            continue
        for index, client in enumerate(clients):
            if client in malicious_ids and client not in attacking:
                continue  # honest this round, and no honest client either
            if client in malicious_ids:
                malicious_total += 1
                true_positive += index in flagged
                if index in flagged:
                    detected_at.setdefault(client, replayed.round_index)
            else:
                honest_total += 1
                false_positive += index in flagged
    first_round = first_attacked or rounds[0].round_index
    return {
        "attack": attack, "share": share, "defense": defense_name(defense), "rounds": len(rounds),
        "malicious_clients": len(malicious_ids),
        "true_positive_rate": true_positive / malicious_total if flags_known and malicious_total else None,
        "false_positive_rate": false_positive / honest_total if flags_known and honest_total else None,
        "rounds_until_detection": (
            float(np.mean([detected_at[c] - first_round + 1 for c in detected_at])) if detected_at else None
        ),
        "damage": float(np.mean(damages)) if damages else None,
        "server_seconds_per_round": float(np.mean(seconds)),
    }


def defense_name(defense: DefenseConfig) -> str:
    return defense.aggregator if defense.screening == "none" else f"{defense.screening}+{defense.aggregator}"


DEFENSES = {
    "mean": DefenseConfig(),
    "median": DefenseConfig(aggregator="median"),
    "trimmed_mean": DefenseConfig(aggregator="trimmed_mean"),
    "multi_krum": DefenseConfig(aggregator="multi_krum", assumed_malicious=3),
    "norm_clip": DefenseConfig(aggregator="norm_clip"),
    "two_stage": DefenseConfig(screening="two_stage"),
}


# (title, key) of the figures each mode reports, in the order tables show them
REPLAY_COLUMNS = (
    ("attack", "attack"), ("malicious", "share"), ("defense", "defense"), ("TPR", "true_positive_rate"),
    ("FPR", "false_positive_rate"), ("rounds to detect", "rounds_until_detection"), ("distortion", "damage"),
    ("server s/round", "server_seconds_per_round"),
)
RUN_COLUMNS = (
    ("attack", "attack"), ("malicious", "share"), ("defense", "defense"), ("loglik acc", "loglik_accuracy"),
    ("drop", "loglik_drop"), ("parsed acc", "accuracy"), ("drop", "accuracy_drop"), ("trigger rate", "trigger_rate"),
    ("above clean", "trigger_rate_above_clean"), ("TPR", "true_positive_rate"), ("FPR", "false_positive_rate"),
    ("rounds to detect", "rounds_until_detection"), ("server s/round", "server_seconds_per_round"),
)


def cell(key: str, value) -> str:
    """A figure as tables show it: shares as percentages, names as they are, n/a where a figure does not apply."""
    if value is None:
        return "n/a"
    if key == "share":
        return f"{value:.0%}"
    return value if isinstance(value, str) else f"{value:.3f}"


def figures_markdown(rows: list[dict], columns) -> str:
    """The figures as a markdown table."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(key, row.get(key)) for _, key in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
