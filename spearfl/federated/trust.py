"""Screening client updates before they are combined: the two-stage robust aggregation scheme of Ma, Lee, Kim and
Brinton ("Detecting and Mitigating Backdoor Attacks in OTA-FL Systems: A Two-Stage Robust Aggregation Scheme",
arXiv 2605.19253), adapted from over-the-air to digital federated learning with LoRA updates.

Stage 1, a multi-indicator trust score. Over the round's contributing clients (weight > 0), each update
(trained - global adapter) gets five indicators chosen for LoRA updates of a language model, and two more where
the server passes the last global update (this round's global adapter - the previous round's):
- norm: log of the update's norm (two-sided: scaling and model replacement push it up, a free-rider's or a
  lazy client's copy of the global adapter pulls it down);
- direction: cosine to the coordinate-wise median update, a reference a minority cannot move (low is bad:
  sign flips, noise, a different objective);
- layer: the worst decoder layer's log distance from the reference's layer, against the round's median for
  that layer (high is bad: backdoors, Neurotoxin and constrained attacks concentrate in a few layers);
- work: log of the tokens the client says it trained per prompt it claims as weight (two-sided: a weight
  claimed without the training behind it);
- similarity: the largest cosine to another client's update (high is bad: Sybil clones send one update, and
  honest clients on their own data do not agree so closely; on the demo task's recorded rounds honest pairs
  sit near 0.1). Devices of one person with the same data would look alike too; they would lose weight;
- alignment: the cosine to the last global update (high is bad);
- novelty: the cosine of what the update adds beyond the last global update to what the reference adds beyond it
  (both with their component along the last global update removed; low is bad).
  Both follow from what a disguised free-rider (Fraboni et al. 2021, arXiv 2006.11901) sends: the last global
  update plus noise, without training. With little noise it is the last update, far closer to it than an honest
  client (cosine 1 / sqrt(1 + noise^2); honest clients of the demo task's recorded rounds sit at 0.25-0.56);
  whatever the noise, beyond the last update it carries nothing of this round's consensus (cosine near 0, where
  those honest clients sit at 0.26-0.54 against a reference they are part of), and with much noise the direction
  indicator sees it. The "delta weights" free-rider (the last global update alone) adds exactly nothing. A
  federation whose every round repeated the last one's direction would leave nothing new to measure.
Each indicator becomes a one-sided robust z-score, (deviation from the round's median) / max(1.4826 MAD,
floor); the floors keep a round of near-identical honest updates from flagging small differences. The score is
the largest z: up to `suspicious_above` a client is trusted, above `malicious_above` malicious, suspicious between.
In the paper the server cannot see single updates over the air and sorts clients by scores they transmit
(trust-based multiple access); here the server holds every update, so it computes the indicators itself.

Stage 2. A suspicious client's update is examined layer by layer: its layers whose own z exceeds
`suspicious_above` are replaced by the reference's, unless they are more than half of its layers (then it is
treated as malicious). A longitudinal reputation in [0, 1] (1 for a client never seen) multiplies every kept
weight: trusted rounds earn back `reputation_recovery`, a suspicious round halves it, a malicious one zeroes it,
and a client below `min_reputation` is left out whatever this round's update looks like. Reputation is server
state: the run's checkpoint keeps it, so a restarted server remembers who misbehaved.
The median and the trimmed mean ignore weights (spearfl.federated.robust), so under them a reputation r < 1
shrinks the update itself towards the global adapter, global + r x update. Shrinking rather than leaving the
client out: it acts by degrees as the weight does under the mean (a client recovering at 0.9 counts nearly in
full), and it keeps the number of values the robust statistic takes, whose honest majority thinner rounds
would lose; below `min_reputation` the client is left out under every combiner.

With fewer than three contributing clients the indicators have no majority to measure against: every client is
trusted by score, and only reputation and the free-rider rule (an update of exactly zero with weight > 0 is
malicious) apply. The thresholds and the reputation rule are our choices; docs/security.md measures them.
Left out: the paper's modality-specific indicators for waveforms and images, and its channel model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from spearfl.federated.robust import AdapterState, flatten, middle, unflatten, updates

MAD_TO_SIGMA = 1.4826  # MAD x 1.4826 estimates a normal distribution's standard deviation
# floors of each indicator's scale: below these differences no honest round should be told apart
FLOORS = {"norm": 0.25, "direction": 0.05, "layer": 0.25, "work": 0.25, "similarity": 0.05, "alignment": 0.05, "novelty": 0.05}
TINY = 1e-12  # a zero norm's stand-in inside a logarithm
LAYER_NAME = re.compile(r"layers\.(\d+)\.")
CATEGORIES = ("trusted", "suspicious", "malicious")
WEIGHT_BLIND = ("median", "trimmed_mean")  # the combiners that ignore client weights (spearfl.federated.robust)


@dataclass(frozen=True)
class Screening:
    """What passes to the combiner: the states (suspicious ones cleaned), the weights after the defense, one record
    per client for the history, and the reputation after this round."""

    states: list[AdapterState]
    weights: list[float]
    records: list[dict]
    reputation: dict[str, float]


def layer_of(name: str) -> str:
    """The decoder layer a LoRA tensor belongs to ("layer 22"), or the tensor's own name outside any layer."""
    found = LAYER_NAME.search(name)
    return f"layer {found.group(1)}" if found else name


def robust_z(values: torch.Tensor, direction: str, floor: float) -> torch.Tensor:
    """One-sided robust z-scores: deviation from the median in the bad direction over max(1.4826 MAD, floor).

    values: [K]; direction: "high" (large is bad), "low", or "both".
    """
    center = middle(values)
    deviation = {"high": values - center, "low": center - values, "both": (values - center).abs()}[direction]
    scale = max(MAD_TO_SIGMA * float(middle((values - center).abs())), floor)
    return deviation.clamp(min=0) / scale


def layer_scores(deltas: list[AdapterState], reference: AdapterState) -> dict[str, torch.Tensor]:
    """Per decoder layer, each client's robust z of log ||update - reference|| over the clients.  # layer -> [K]"""
    groups: dict[str, list[str]] = {}
    for name in sorted(reference):
        groups.setdefault(layer_of(name), []).append(name)
    scores = {}
    for layer, names in groups.items():
        distances = torch.tensor(
            [math.sqrt(sum(float((delta[n] - reference[n]).double().square().sum()) for n in names)) for delta in deltas]
        )
        scores[layer] = robust_z(distances.clamp(min=TINY).log(), "high", FLOORS["layer"])
    return scores


def novelty(vectors: torch.Tensor, reference: torch.Tensor, global_step: AdapterState) -> torch.Tensor:
    """Each update's cosine to the reference, both with their component along the last global update removed.

    vectors: [K, P]; reference: [P] -> [K]"""
    step = flatten(global_step).double()
    unit = step / max(float(step.norm()), TINY)  # [P]
    residuals = vectors - (vectors @ unit).unsqueeze(1) * unit  # [K, P]
    centre = reference - (reference @ unit) * unit  # [P]
    return (residuals @ centre) / (residuals.norm(dim=1) * centre.norm()).clamp(min=TINY)


def indicators(
    deltas: list[AdapterState], weights: list[float], metrics: list[dict], global_step: AdapterState | None = None
) -> tuple[dict, dict, AdapterState]:
    """(indicator -> [K] robust z, layer -> [K] robust z, the reference update) of the contributing clients."""
    vectors = torch.stack([flatten(delta) for delta in deltas]).double()  # [K, P]
    reference_vector = middle(vectors)  # [P]
    reference = unflatten(reference_vector, deltas[0])
    norms = vectors.norm(dim=1)  # [K]
    cosine = (vectors @ reference_vector) / (norms * reference_vector.norm()).clamp(min=TINY)
    layers = layer_scores(deltas, reference)
    units = vectors / norms.clamp(min=TINY).unsqueeze(1)
    pairwise = units @ units.T  # [K, K] cosines
    pairwise.fill_diagonal_(-1.0)
    scores = {
        "norm": robust_z(norms.clamp(min=TINY).log(), "both", FLOORS["norm"]),
        "direction": robust_z(cosine, "low", FLOORS["direction"]),
        "layer": torch.stack(list(layers.values())).amax(dim=0),
        "similarity": robust_z(pairwise.amax(dim=1), "high", FLOORS["similarity"]),
    }
    if all("trained_tokens" in m for m in metrics):
        work = torch.tensor([max(m["trained_tokens"], TINY) / w for m, w in zip(metrics, weights)], dtype=torch.float64)
        scores["work"] = robust_z(work.log(), "both", FLOORS["work"])
    if global_step is not None:
        step = flatten(global_step).double()  # [P]
        alignment = (vectors @ step) / (norms * step.norm()).clamp(min=TINY)
        scores["alignment"] = robust_z(alignment, "high", FLOORS["alignment"])
        scores["novelty"] = robust_z(novelty(vectors, reference_vector, global_step), "low", FLOORS["novelty"])
    return scores, layers, reference


def categorise(score: float, settings) -> str:
    if score > settings.malicious_above:
        return "malicious"
    return "suspicious" if score > settings.suspicious_above else "trusted"


def next_reputation(reputation: float, category: str, settings) -> float:
    """Trusted rounds earn back slowly; a suspicious round halves the reputation, a malicious one zeroes it."""
    if category == "trusted":
        return min(1.0, reputation + settings.reputation_recovery)
    return reputation / 2 if category == "suspicious" else 0.0


def cleaned(global_state: AdapterState, state: AdapterState, reference: AdapterState, layers: list[str]) -> AdapterState:
    """The state with the named layers' update replaced by the reference update."""
    return {
        name: global_state[name] + reference[name] if layer_of(name) in layers else tensor for name, tensor in state.items()
    }


def shrunk(global_state: AdapterState, state: AdapterState, factor: float) -> AdapterState:
    """global + factor x (state - global): a reputation acting where weights do not."""
    return {name: global_state[name] + factor * (tensor - global_state[name]) for name, tensor in state.items()}


def two_stage(
    global_state: AdapterState,
    states: list[AdapterState],
    weights: list[float],
    clients: list[int],
    metrics: list[dict],
    reputation: dict[str, float],
    settings,
    global_step: AdapterState | None = None,
) -> Screening:
    """Score, sort, inspect and reweigh the round's clients; `reputation` maps str(client) -> [0, 1].

    global_step: the last global update (this round's global adapter - the previous round's), None in the first."""
    kept = [index for index, weight in enumerate(weights) if weight > 0]
    deltas = updates(global_state, [states[index] for index in kept])
    judged = len(kept) >= 3
    kept_weights, kept_metrics = [weights[i] for i in kept], [metrics[i] for i in kept]
    scores, layers, reference = indicators(deltas, kept_weights, kept_metrics, global_step) if judged else ({}, {}, {})
    new_states, new_weights, records = list(states), [0.0] * len(states), []
    new_reputation = dict(reputation)
    for position, index in enumerate(kept):
        z = {name: float(values[position]) for name, values in scores.items()}
        category = categorise(max(z.values(), default=0.0), settings)
        if not any(bool(tensor.any()) for tensor in deltas[position].values()):
            category = "malicious"  # a free-rider: the global adapter sent back, with a weight claimed
        flagged = []
        if category == "suspicious":
            flagged = [layer for layer, values in layers.items() if float(values[position]) > settings.suspicious_above]
            if 2 * len(flagged) > len(layers):
                category = "malicious"
            elif flagged:
                new_states[index] = cleaned(global_state, states[index], reference, flagged)
        key = str(clients[index])
        new_reputation[key] = next_reputation(reputation.get(key, 1.0), category, settings)
        excluded = category == "malicious" or new_reputation[key] < settings.min_reputation
        new_weights[index] = 0.0 if excluded else weights[index] * new_reputation[key]
        if settings.aggregator in WEIGHT_BLIND and not excluded and new_reputation[key] < 1.0:
            new_states[index] = shrunk(global_state, new_states[index], new_reputation[key])
        records.append({
            "client": clients[index], "score": max(z.values(), default=0.0), "category": category,
            "reputation": new_reputation[key], "weight": new_weights[index], "indicators": z, "flagged_layers": flagged,
        })
    return Screening(new_states, new_weights, records, new_reputation)


def no_screening(global_state, states, weights, clients, metrics, reputation, settings, global_step=None) -> Screening:
    """Every reply as it came; no records, reputation untouched."""
    return Screening(list(states), list(weights), [], dict(reputation))


# (global_state, states, weights, clients, metrics, reputation, settings, global_step) -> Screening
SCREENINGS = {"none": no_screening, "two_stage": two_stage}
