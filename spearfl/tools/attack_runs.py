"""The attack bench's end-to-end runs: whole federated runs with a share of malicious clients, each attack under
each defense, for the figures replay cannot give (clean accuracy, a backdoor's success, attacks that need
poisoned training).

Every (attack, share, defense) is a run folder DIR/<attack>-<share>pct-<defense>, run or resumed like any run
(`spearfl run`), the base model loaded once. The malicious clients are the first ceil(share x clients) of a
permutation seeded by the config's seed, the same in every run, so runs differ only in what those clients do and
what the server does about it. Every run probes the same backdoor trigger on the held-out questions
(`eval.trigger`, by default the attack config's), so the runs without an attack measure how often the phrase alone
draws the target option. From each folder's history:
- clean accuracy: the final held-out option log-likelihood and parsed accuracy, and their drop against the
  run without an attack and without a defense (`mean`) where there is one, else without an attack under the
  same defense;
- attack success: the final trigger rate (triggered held-out questions answered with the target option) and how
  far it is above the no-attack run's;
- detection, as the replay counts it (`spearfl.tools.attack_bench`): true and false positive rates over client
  rounds, rounds until each malicious client is first flagged (from its attack's first round);
- server seconds per round (screening, combination and the server step, from the history).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spearfl.config import AttackConfig, RunConfig, config_to_dict, validate
from spearfl.runtime.run_folder import RunFolder
from spearfl.tools.attack_bench import DEFENSES
from spearfl.tools.compare import run_configs

# name -> the attack config's fields (without its clients); None: no attack
RUN_ATTACKS: dict[str, dict | None] = {
    "none": None,
    "flipped": {"feedback": "flipped"},
    "backdoor": {"feedback": "backdoor"},
    # model replacement (Bagdasaryan et al. 2020): the backdoored update boosted by gamma = the round's weight
    # over its own
    "backdoor_replacement": {"feedback": "backdoor", "update": "model_replacement"},
    # a distributed backdoor (Xie et al. 2020): each colluder poisons with its part of the trigger (one part per
    # malicious client, at most one per word: filled in per share)
    "backdoor_dba": {"feedback": "backdoor", "trigger_parts": None},
    # the constrained attacks are made to pass for honest: they claim the weight their round earned
    "backdoor_bounded": {"feedback": "backdoor", "update": "bounded_scaling", "bound": 3.0, "weight": "trained"},
    "backdoor_euclidean": {"feedback": "backdoor", "update": "euclidean", "bound": 1.0, "weight": "trained"},
    "backdoor_cosine": {"feedback": "backdoor", "update": "cosine", "cosine": 0.9, "weight": "trained"},
    # Neurotoxin as published: every step off the top 5% of the last global update, in a PGD ball of the honest norm
    "backdoor_neurotoxin": {"feedback": "backdoor", "update": "neurotoxin", "weight": "trained"},
    "sign_flip": {"update": "sign_flip"},
    "gaussian": {"update": "gaussian"},
    "free_rider": {"update": "free_rider"},
    "disguised_free_rider": {"update": "disguised_free_rider", "weight": "trained"},  # Fraboni et al. 2021
    "sybil": {"update": "sign_flip", "sybil": True},
    "sybil_perturbed": {"update": "sign_flip", "sybil": True, "sybil_noise": 0.5},
}


@dataclass(frozen=True)
class PlannedRun:
    attack: str
    share: float
    defense: str
    malicious: list[int]
    config: RunConfig


def malicious_clients(config: RunConfig, share: float) -> list[int]:
    """The first ceil(share x clients) of a permutation of the clients seeded by the config's seed."""
    count = math.ceil(share * config.data.num_clients - 1e-9)
    order = np.random.default_rng(config.seed).permutation(config.data.num_clients)
    return sorted(int(client) for client in order[:count])


def probe_settings(config: RunConfig) -> dict:
    """The eval section with a trigger to probe: the config's, or the attack config's default one."""
    settings = config_to_dict(config)["eval"]
    if settings["trigger"] is None:
        default = AttackConfig(clients=[0])
        settings |= {"trigger": default.trigger, "trigger_target": default.target_option}
    return settings


def plan_run(config: RunConfig, attack: str, share: float, defense: str, output_dir: Path) -> PlannedRun:
    """The run of one attack at one share of malicious clients under one defense."""
    fields, chosen, probe = RUN_ATTACKS[attack], malicious_clients(config, share), probe_settings(config)
    if fields is None or not chosen:
        attack, share, chosen, attacks = "none", 0.0, [], []
    else:
        fields = dict(fields)
        if "trigger_parts" in fields:
            fields["trigger_parts"] = max(1, min(len(chosen), len(probe["trigger"].split())))
        attacks = [{"clients": chosen, "trigger": probe["trigger"], "target_option": probe["trigger_target"], **fields}]
    folder = Path(output_dir) / f"{attack}-{round(share * 100)}pct-{defense}"
    run_config = validate({
        **config_to_dict(config), "output_dir": str(folder), "attacks": attacks,
        "defense": config_to_dict(DEFENSES[defense]), "eval": probe,
    })
    return PlannedRun(attack, share, defense, chosen, run_config)


def plan(config: RunConfig, attacks: list[str], shares: list[float], defenses: list[str], output_dir: Path) -> list[PlannedRun]:
    """Every combination, the attack-free runs once per defense, in the order they run."""
    runs: dict[str, PlannedRun] = {}
    for defense in defenses:
        for attack in ["none", *attacks]:
            for share in shares:
                planned = plan_run(config, attack, share, defense, output_dir)
                runs.setdefault(planned.config.output_dir, planned)
    return list(runs.values())


def run_all(planned: list[PlannedRun], show_progress: bool = True) -> None:
    """Run or resume every planned run; refuse before the first if a folder holds a different run."""
    run_configs([run.config for run in planned], show_progress)


def detection(history: list[dict], malicious: set[int], aggregator: str) -> dict:
    """True and false positive rates over the client rounds a defense judged, and rounds until detection; None
    where the defense flags nobody by design (mean, median, trimmed mean)."""
    positives = negatives = true_positive = false_positive = 0
    first_flagged: dict[int, int] = {}
    known = False
    rounds = [row for row in history if row.get("clients")]
    for row in rounds:
        clients = [entry["client"] for entry in row["clients"]]
        flagged = flagged_in(row, clients, aggregator)
        if "screening" in row:  # only the clients screened (a weight of 0 is never screened) can be told apart
            clients = [record["client"] for record in row["screening"]]
        if flagged is None:
            continue
        known = True
        for client in clients:
            if client in malicious:
                positives += 1
                true_positive += client in flagged
                if client in flagged:
                    first_flagged.setdefault(client, row["round"])
            else:
                negatives += 1
                false_positive += client in flagged
    start = rounds[0]["round"] if rounds else 1
    return {
        "true_positive_rate": true_positive / positives if known and positives else None,
        "false_positive_rate": false_positive / negatives if known and negatives else None,
        "rounds_until_detection": float(np.mean([r - start + 1 for r in first_flagged.values()])) if first_flagged else None,
    }


def flagged_in(row: dict, clients: list[int], aggregator: str) -> set[int] | None:
    """The clients a round's defense flagged: screened other than trusted, left out by multi-Krum, clipped."""
    if "screening" in row:
        return {record["client"] for record in row["screening"] if record["category"] != "trusted"}
    notes = row.get("aggregation") or {}
    if aggregator == "multi_krum":
        selected = set(notes.get("selected", range(len(clients))))
        return {client for index, client in enumerate(clients) if index not in selected}
    if aggregator == "norm_clip":
        return {clients[index] for index in notes.get("clipped", [])}
    return None


def run_figures(run: PlannedRun) -> dict:
    """One finished run's figures, from its folder."""
    folder = RunFolder(run.config.output_dir)
    history = folder.read_history()
    final = [row["eval"] for row in history if "eval" in row][-1]
    seconds = [row["server_seconds"] for row in history if "server_seconds" in row]
    return {
        "attack": run.attack, "share": run.share, "defense": run.defense, "malicious_clients": run.malicious,
        "folder": str(folder.path),
        "loglik_accuracy": final.get("loglik_accuracy"), "accuracy": final.get("accuracy"),
        "trigger_rate": final.get("trigger_rate"), "trigger_loglik_rate": final.get("trigger_loglik_rate"),
        **detection(history, set(run.malicious), run.config.defense.aggregator),
        "server_seconds_per_round": float(np.mean(seconds)) if seconds else None,
    }


def with_references(rows: list[dict]) -> list[dict]:
    """Each row with its drop in clean accuracy and its trigger rate above those of the attack-free run: the one
    without a defense (`mean`) where there is one, else the one under the same defense."""
    clean = {row["defense"]: row for row in rows if row["attack"] == "none"}
    for row in rows:
        reference = clean.get("mean") or clean.get(row["defense"])
        row["reference"] = None if reference is None else f"none-0pct-{reference['defense']}"
        for key, name in (("loglik_accuracy", "loglik_drop"), ("accuracy", "accuracy_drop")):
            row[name] = None if reference is None or row[key] is None or reference[key] is None else reference[key] - row[key]
        have = reference is not None and row["trigger_rate"] is not None and reference["trigger_rate"] is not None
        row["trigger_rate_above_clean"] = row["trigger_rate"] - reference["trigger_rate"] if have else None
    return rows


def attack_runs(
    config: RunConfig, attacks: list[str], shares: list[float], defenses: list[str], output_dir: Path, show_progress: bool = True
) -> list[dict]:
    """Run (or resume) every combination and return the figures, the attack-free runs first."""
    planned = plan(config, attacks, shares, defenses, output_dir)
    run_all(planned, show_progress)
    return with_references([run_figures(run) for run in planned])
