"""Byzantine-robust ways to combine client adapters, in place of the weighted mean.

Each combiner takes the global adapter and the clients' trained adapters with their weights and returns the
combined adapter (None when no client has weight > 0) and notes for the history; the server strategy (FedAvg,
FedAdam, FedYogi) then applies it as it applies the weighted mean. They work on updates (trained - global).

- median: coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", arXiv 1803.01498). The mean of the two middle values when the count is even.
- trimmed_mean: per coordinate, the `trim_fraction` largest and smallest values dropped, the rest averaged
  (same paper).
- multi_krum: each update scored by its summed squared distance to its n - f - 2 nearest others, the n - f best
  averaged with their weights (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS; multi-Krum as El Mhamdi et al. 2018, arXiv 1802.07927, define it). f is
  `defense.assumed_malicious`; Krum asks n > 2f + 2 and, with fewer clients, takes f as large as they allow.
- norm_clip: every update scaled down to norm at most C, then the weighted mean (Sun et al. 2019, "Can You Really
  Backdoor Federated Learning?", arXiv 1911.07963). C is `defense.clip_norm`, or, when unset, the median of the
  round's update norms (our choice: no scale to tune, and a majority of honest clients bounds it).

Client weights (prompts trained on) count in the mean, multi-Krum's average and the clipped mean; the median
and the trimmed mean ignore them, as in their paper and in Flower's FedMedian and FedTrimmedAvg: a weight a
client claims is one more thing an attacker controls. A weight-0 client takes part in none of them.
Left out: Bulyan, geometric median (RFA), FLTrust (it needs a root dataset on the server).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from spearfl.config import krum_malicious, trim_count
from spearfl.federated.aggregation import AdapterState, check_same_layout, weighted_average

# (global adapter, client adapters, weights, settings) -> (combined adapter or None, notes for the history)
Combiner = Callable[..., tuple[AdapterState | None, dict]]


def contributing(states: list[AdapterState], weights: list[float]) -> list[int]:
    """Indices of the clients with weight > 0 (weights checked to be >= 0)."""
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(weight < 0 for weight in weights):
        raise ValueError(f"weights must be >= 0, got {weights}")
    return [index for index, weight in enumerate(weights) if weight > 0]


def updates(global_state: AdapterState, states: list[AdapterState]) -> list[AdapterState]:
    """Each client's update: its trained adapter minus the global one, layouts checked."""
    for state in states:
        check_same_layout(global_state, state)
    return [{name: state[name] - global_state[name] for name in global_state} for state in states]


def flatten(update: AdapterState) -> torch.Tensor:
    """All of an update's values as one vector, tensors in the order of their names.  # [P]

    Sorted names, not the dict's order: an adapter loaded from safetensors lists its tensors sorted, one fresh from
    training in the model's order, and whatever is drawn or summed over the vector must not depend on which.
    """
    return torch.cat([update[name].reshape(-1) for name in sorted(update)])


def unflatten(vector: torch.Tensor, like: AdapterState) -> AdapterState:
    """A vector from `flatten` back into tensors of `like`'s names, shapes and dtypes.  # [P] -> state"""
    state, offset = {}, 0
    for name in sorted(like):
        tensor = like[name]
        state[name] = vector[offset : offset + tensor.numel()].reshape(tensor.shape).to(tensor.dtype)
        offset += tensor.numel()
    return {name: state[name] for name in like}


def apply(global_state: AdapterState, update: AdapterState) -> AdapterState:
    return {name: global_state[name] + update[name] for name in global_state}


def mean(global_state, states, weights, settings=None) -> tuple[AdapterState | None, dict]:
    """The weighted mean (FedAvg's), in the combiner signature."""
    return weighted_average(states, weights), {}


def per_coordinate(global_state, states, weights, reduce: Callable[[torch.Tensor], torch.Tensor]) -> AdapterState | None:
    """global + reduce(stacked updates) per tensor, over the contributing clients; `reduce` maps [K, ...] to [...]."""
    kept = contributing(states, weights)
    if not kept:
        return None
    deltas = updates(global_state, [states[index] for index in kept])
    return apply(global_state, {name: reduce(torch.stack([delta[name] for delta in deltas])) for name in global_state})


def middle(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over dim 0; the mean of the two middle values for an even count.  # [K, ...] -> [...]"""
    ordered = stacked.sort(dim=0).values
    count = ordered.shape[0]
    return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2


def median(global_state, states, weights, settings=None) -> tuple[AdapterState | None, dict]:
    """Coordinate-wise median of the updates (unweighted)."""
    return per_coordinate(global_state, states, weights, middle), {}


def trimmed(stacked: torch.Tensor, trim: int) -> torch.Tensor:
    """Mean over dim 0 after dropping the `trim` largest and smallest values of each coordinate.  # [K, ...] -> [...]"""
    ordered = stacked.sort(dim=0).values
    return ordered[trim : ordered.shape[0] - trim].mean(dim=0)


def trimmed_mean(global_state, states, weights, settings) -> tuple[AdapterState | None, dict]:
    """Coordinate-wise trimmed mean of the updates (unweighted)."""
    count = len(contributing(states, weights))
    trim = trim_count(count, settings.trim_fraction)
    notes = {"trimmed_each_end": trim} | ({"degenerate": f"{count} clients: nothing trimmed, the plain mean"} if count and not trim else {})
    return per_coordinate(global_state, states, weights, lambda stacked: trimmed(stacked, trim)), notes


def krum_scores(vectors: torch.Tensor, num_malicious: int) -> torch.Tensor:
    """Krum's score of each row: summed squared distance to its n - f - 2 nearest other rows.  # [K, P] -> [K]"""
    distances = torch.cdist(vectors.double(), vectors.double()).square()  # [K, K]
    neighbours = max(vectors.shape[0] - num_malicious - 2, 1)
    nearest = distances.sort(dim=1).values[:, 1 : neighbours + 1]  # column 0 is the row's distance to itself
    return nearest.sum(dim=1)


def multi_krum(global_state, states, weights, settings) -> tuple[AdapterState | None, dict]:
    """The weighted mean of the n - f updates with the lowest Krum scores."""
    kept = contributing(states, weights)
    if not kept:
        return None, {}
    deltas = updates(global_state, [states[index] for index in kept])
    num_malicious = krum_malicious(len(kept), settings.assumed_malicious)
    scores = krum_scores(torch.stack([flatten(delta) for delta in deltas]), num_malicious)
    chosen = sorted(scores.argsort()[: len(kept) - num_malicious].tolist())
    selected = [kept[index] for index in chosen]
    combined = weighted_average([states[index] for index in selected], [weights[index] for index in selected])
    notes = {"krum_f": num_malicious, "selected": selected, "krum_scores": [float(score) for score in scores]}
    if num_malicious < settings.assumed_malicious:
        notes["degenerate"] = f"{len(kept)} clients: Krum assumes f = {num_malicious} of the {settings.assumed_malicious} configured"
    return combined, notes


def norm_clip(global_state, states, weights, settings) -> tuple[AdapterState | None, dict]:
    """The weighted mean of the updates, each scaled to norm at most C (configured, or the round's median norm)."""
    kept = contributing(states, weights)
    if not kept:
        return None, {}
    deltas = updates(global_state, [states[index] for index in kept])
    bound = settings.clip_norm
    if bound is None:
        bound = float(middle(torch.tensor([float(flatten(delta).double().norm()) for delta in deltas])))
    bounded = [clipped(delta, bound) for delta in deltas]
    combined = weighted_average([apply(global_state, delta) for delta, _ in bounded], [weights[index] for index in kept])
    return combined, {"clip_norm": bound, "clipped": [kept[i] for i, (_, was) in enumerate(bounded) if was]}


def clipped(update: AdapterState, bound: float) -> tuple[AdapterState, bool]:
    """The update scaled down to norm at most `bound`, and whether it was.

    The bound holds for the tensors as they are returned, in their own dtype: scaling a float32 tensor by
    bound / norm rounds every value, and the rounded vector's norm can come out a few ulps above the bound, so
    the factor is shrunk by float32 ulps until the stored result's norm, measured in float64, is within it."""
    norm = float(flatten(update).double().norm())
    if norm <= bound:
        return update, False
    factor = bound / norm
    for _ in range(64):
        scaled = {name: (tensor.double() * factor).to(tensor.dtype) for name, tensor in update.items()}
        if float(flatten(scaled).double().norm()) <= bound:
            return scaled, True
        factor *= 1 - 2.0**-23
    raise ArithmeticError(f"could not scale an update of norm {norm} within {bound} in its own dtype")


COMBINERS: dict[str, Combiner] = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "multi_krum": multi_krum,
    "norm_clip": norm_clip,
}
