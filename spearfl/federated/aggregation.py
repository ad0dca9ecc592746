"""Server aggregation of client adapters: weighted FedAvg, and FedAdam / FedYogi on the pseudo-gradient.

FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv 1602.05629.
FedAdam, FedYogi: Reddi et al. 2021, "Adaptive Federated Optimization", arXiv 2003.00295,
Algorithm 2, applied to the pseudo-gradient delta = weighted average - global.

Every function is pure: adapter states (dict name -> fp32 tensor, any shapes) and the server
optimizer state go in, new values come out, nothing is changed in place.

Weights: a client that skipped training reports weight 0 and contributes nothing, so a stale
copy of the global adapter never dilutes the others. When every weight is 0 there is no
update: `weighted_average` returns None, and every strategy returns the global adapter and
the server state unchanged (the server optimizer takes no step, as in Flower, whose strategies
return no parameters when nothing was aggregated).

Conventions of the adaptive strategies, chosen to match Flower's FedAdam / FedYogi
(flwr.serverapp.strategy, framework/py/flwr/serverapp/strategy/fedadam.py and fedyogi.py):
- m and v start at zero. (Reddi et al.'s Algorithm 2 starts from v >= tau^2; Flower and we
  start from zero, which makes the first FedAdam step eta * sign(delta) when tau is small.)
- tau sits outside the square root: new = global + step_size * m / (sqrt(v) + tau).
- FedAdam scales eta by Adam's bias correction, step_size = eta * sqrt(1 - beta2^t) / (1 - beta1^t)
  (Kingma & Ba 2015, alpha_t), as Flower's FedAdam does. t counts the server updates applied,
  starting at 1. Flower uses t = server_round + 1 with server_round starting at 1, so its
  first step already uses t = 2; we keep Adam's own count.
- FedYogi takes no bias correction (neither the paper nor Flower's FedYogi apply one).
The LoRA averaging gap: averaging A and B separately gives mean(B) mean(A), not the average update
mean(B A); `lora_average_error` measures the difference every round (0 under FFA-LoRA, where A is shared).
Left out: FedAdagrad and server momentum (FedAvgM); the client learning rate eta_l of the
paper belongs to the client's own optimizer, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spearfl.config import ServerConfig

AdapterState = dict[str, torch.Tensor]

FIRST_MOMENT_PREFIX = "first_moment/"
SECOND_MOMENT_PREFIX = "second_moment/"


@dataclass(frozen=True)
class ServerOptimizerState:
    """Moments of the adaptive server optimizer; empty dicts until the first step."""

    first_moment: AdapterState  # m, same keys and shapes as the adapter
    second_moment: AdapterState  # v, same keys and shapes as the adapter
    num_steps: int  # t: server updates applied so far


def initial_server_state() -> ServerOptimizerState:
    """State before any round: no moments yet (they start at zero on the first step)."""
    return ServerOptimizerState(first_moment={}, second_moment={}, num_steps=0)


def check_same_layout(reference: AdapterState, other: AdapterState) -> None:
    """Raise ValueError unless `other` has exactly the keys and shapes of `reference`."""
    if other.keys() != reference.keys():
        missing = sorted(reference.keys() - other.keys())
        extra = sorted(other.keys() - reference.keys())
        raise ValueError(f"adapter keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in reference.items():
        if other[name].shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(other[name].shape)} != {tuple(tensor.shape)}")


def contributing_clients(states: list[AdapterState], weights: list[float]) -> list[tuple[AdapterState, float]]:
    """(state, weight / total weight) of each client with weight > 0, layouts checked; [] when every weight is 0.

    Clients with weight 0 are left out entirely (their states are not even read).
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(weight < 0 for weight in weights):
        raise ValueError(f"weights must be >= 0, got {weights}")
    contributing = [(state, float(weight)) for state, weight in zip(states, weights) if weight > 0]
    total_weight = sum(weight for _, weight in contributing)
    for state, _ in contributing[1:]:
        check_same_layout(contributing[0][0], state)
    return [(state, weight / total_weight) for state, weight in contributing]


def weighted_average(states: list[AdapterState], weights: list[float]) -> AdapterState | None:
    """Average of the states weighted by `weights`; None when every weight is 0 (no update)."""
    contributing = contributing_clients(states, weights)
    if not contributing:
        return None
    return {name: sum(fraction * state[name] for state, fraction in contributing) for name in contributing[0][0]}


def lora_average_error(
    states: list[AdapterState], weights: list[float], shared: AdapterState | None = None
) -> float | None:
    """Relative error of averaging A and B apart: ||mean(B) mean(A) - mean(B A)||_F / ||mean(B A)||_F.

    states: name -> tensor, "...lora_A.weight" [r, in] and "...lora_B.weight" [out, r]; shared: the A factors
    every client holds and none sends (FFA-LoRA), same names. Means are weighted as in `weighted_average`;
    Frobenius norms pooled over modules (square root of the summed squares); alpha / r cancels. None with
    fewer than two contributing clients, no A/B pair, or mean(B A) zero everywhere.
    Why: mean(B) mean(A) != mean(B A) (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated
    Learning", arXiv 2403.12313, section 3); with a shared A the two are equal and the error is exactly 0.
    """
    contributing = contributing_clients(states, weights)
    if len(contributing) < 2:
        return None
    shared = shared or {}
    fractions = [fraction for _, fraction in contributing]
    gap = mean_product = 0.0
    for b_name, a_name in lora_pairs(contributing[0][0], shared):
        b_factors = [state[b_name].double() for state, _ in contributing]  # K x [out, r]
        a_factors = [state.get(a_name, shared.get(a_name)).double() for state, _ in contributing]  # K x [r, in]
        module_gap, module_product = module_average_error(b_factors, a_factors, fractions)
        gap, mean_product = gap + module_gap, mean_product + module_product
    if mean_product <= 0:  # a Gram trace of zero factors can round to a hair below 0
        return None
    return math.sqrt(max(gap, 0.0) / mean_product)


def module_average_error(
    b_factors: list[torch.Tensor], a_factors: list[torch.Tensor], fractions: list[float]
) -> tuple[float, float]:
    """(||mean(B) mean(A) - mean(B A)||^2, ||mean(B A)||^2) of one LoRA module.

    b_factors: K x [out, r]; a_factors: K x [r, in]; fractions: K weights summing to 1.
    """
    mean_b, mean_a = weighted_mean(b_factors, fractions), weighted_mean(a_factors, fractions)
    # mean(B) mean(A) - mean(B A) = -sum_k f_k (B_k - mean B)(A_k - mean A), as the f_k sum to 1: no cancellation
    weighted_b_deviations = [fraction * (b - mean_b) for fraction, b in zip(fractions, b_factors)]
    gap = squared_norm_of_sum(weighted_b_deviations, [a - mean_a for a in a_factors])
    product = squared_norm_of_sum([fraction * b for fraction, b in zip(fractions, b_factors)], a_factors)
    return gap, product


def lora_pairs(state: AdapterState, shared: AdapterState) -> list[tuple[str, str]]:
    """(B name, A name) of every LoRA module whose B is in `state` and whose A is in `state` or `shared`."""
    pairs = [(name, name.replace("lora_B", "lora_A")) for name in state if "lora_B" in name]
    return [(b_name, a_name) for b_name, a_name in pairs if a_name in state or a_name in shared]


def weighted_mean(tensors: list[torch.Tensor], fractions: list[float]) -> torch.Tensor:
    """sum_k f_k T_k; identical tensors (a shared A) are their own mean, exactly rather than up to rounding."""
    if all(torch.equal(tensor, tensors[0]) for tensor in tensors[1:]):
        return tensors[0]
    return sum(fraction * tensor for fraction, tensor in zip(fractions, tensors))


def squared_norm_of_sum(lefts: list[torch.Tensor], rights: list[torch.Tensor]) -> float:
    """||sum_k L_k R_k||_F^2 from two Kr x Kr Gram matrices, never forming an [out, in] product.

    lefts: K x [out, r]; rights: K x [r, in]. With L = [L_1 ... L_K] and R = [R_1; ...; R_K], the sum is L R and
    ||L R||_F^2 = trace(L^T L R R^T), which is the elementwise sum of the two symmetric Gram matrices' product.
    """
    left = torch.cat(lefts, dim=1)  # [out, K r]
    right = torch.cat(rights, dim=0)  # [K r, in]
    return float(torch.sum((left.T @ left) * (right @ right.T)))


def fedavg(global_state: AdapterState, states: list[AdapterState], weights: list[float]) -> AdapterState:
    """New global adapter = weighted average of the client states; the old one when all weights are 0."""
    average = weighted_average(states, weights)
    if average is None:
        return global_state
    check_same_layout(global_state, average)
    return average


def fedavg_step(
    global_state: AdapterState, combined: AdapterState | None, server_state: ServerOptimizerState, settings: ServerConfig
) -> tuple[AdapterState, ServerOptimizerState]:
    """FedAvg's server step: the combined client adapters become the global one; no server state."""
    if combined is None:
        return global_state, server_state
    check_same_layout(global_state, combined)
    return combined, server_state


def _zeros_like(state: AdapterState) -> AdapterState:
    return {name: torch.zeros_like(tensor) for name, tensor in state.items()}


def _update_first_moment(first_moment: AdapterState, delta: AdapterState, beta1: float) -> AdapterState:
    """m = beta1 m + (1 - beta1) delta."""
    return {name: beta1 * first_moment[name] + (1 - beta1) * delta[name] for name in delta}


def adam_second_moment(second_moment: AdapterState, delta: AdapterState, beta2: float) -> AdapterState:
    """Adam: v = beta2 v + (1 - beta2) delta^2."""
    return {name: beta2 * second_moment[name] + (1 - beta2) * delta[name].square() for name in delta}


def yogi_second_moment(second_moment: AdapterState, delta: AdapterState, beta2: float) -> AdapterState:
    """Yogi: v = v - (1 - beta2) delta^2 sign(v - delta^2); v moves additively, so it never jumps."""
    updated = {}
    for name in delta:
        squared = delta[name].square()
        updated[name] = second_moment[name] - (1 - beta2) * squared * torch.sign(second_moment[name] - squared)
    return updated


def _adaptive_step(
    global_state: AdapterState,
    combined: AdapterState | None,
    server_state: ServerOptimizerState,
    settings: ServerConfig,
    update_second_moment: Callable[[AdapterState, AdapterState, float], AdapterState],
    step_size: Callable[[ServerConfig, int], float],
) -> tuple[AdapterState, ServerOptimizerState]:
    """One FedOpt server step on the pseudo-gradient (combined - global), with the algorithm's v update and step size."""
    if combined is None:
        return global_state, server_state
    check_same_layout(global_state, combined)
    delta = {name: combined[name] - global_state[name] for name in global_state}
    first_moment = server_state.first_moment or _zeros_like(delta)
    second_moment = server_state.second_moment or _zeros_like(delta)
    check_same_layout(global_state, first_moment)
    check_same_layout(global_state, second_moment)

    first_moment = _update_first_moment(first_moment, delta, settings.beta1)
    second_moment = update_second_moment(second_moment, delta, settings.beta2)
    num_steps = server_state.num_steps + 1
    size = step_size(settings, num_steps)
    new_global = {
        name: global_state[name] + size * first_moment[name] / (second_moment[name].sqrt() + settings.tau)
        for name in global_state
    }
    return new_global, ServerOptimizerState(first_moment, second_moment, num_steps)


def adam_step_size(settings: ServerConfig, num_steps: int) -> float:
    """eta * sqrt(1 - beta2^t) / (1 - beta1^t): Adam's bias correction folded into the step size."""
    return settings.server_lr * math.sqrt(1 - settings.beta2**num_steps) / (1 - settings.beta1**num_steps)


def yogi_step_size(settings: ServerConfig, num_steps: int) -> float:
    """eta, uncorrected (Reddi et al. Algorithm 2; Flower's FedYogi)."""
    return settings.server_lr


def adaptive_step(
    update_second_moment: Callable[[AdapterState, AdapterState, float], AdapterState],
    step_size: Callable[[ServerConfig, int], float],
) -> Callable[..., tuple[AdapterState, ServerOptimizerState]]:
    """A FedOpt server step in the common step signature, from its second-moment update and step size."""

    def step(global_state, combined, server_state, settings):
        return _adaptive_step(global_state, combined, server_state, settings, update_second_moment, step_size)

    return step


# Server steps: (global_state, combined client adapters or None, server_state, settings) -> (new_global,
# new_server_state). How the clients' adapters are combined (the weighted mean, or a robust combiner:
# spearfl.federated.robust) is chosen apart from the step.
SERVER_STEPS = {
    "fedavg": fedavg_step,
    # FedAdam (Reddi et al. 2021, arXiv 2003.00295) with Flower's bias-corrected step size.
    "fedadam": adaptive_step(adam_second_moment, adam_step_size),
    # FedYogi (Reddi et al. 2021, arXiv 2003.00295).
    "fedyogi": adaptive_step(yogi_second_moment, yogi_step_size),
}


def with_mean(step):
    """A strategy over client states and weights: the server step applied to their weighted mean."""

    def strategy(global_state, states, weights, server_state, settings):
        return step(global_state, weighted_average(states, weights), server_state, settings)

    return strategy


# Common signature: (global_state, states, weights, server_state, settings) -> (new_global, new_server_state)
SERVER_STRATEGIES = {name: with_mean(step) for name, step in SERVER_STEPS.items()}
fedavg_strategy, fedadam, fedyogi = (SERVER_STRATEGIES[name] for name in ("fedavg", "fedadam", "fedyogi"))


def state_to_tensors(state: ServerOptimizerState) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Flatten the server state into tensors (for safetensors) and JSON metadata (step count)."""
    tensors = {FIRST_MOMENT_PREFIX + name: tensor for name, tensor in state.first_moment.items()}
    tensors |= {SECOND_MOMENT_PREFIX + name: tensor for name, tensor in state.second_moment.items()}
    return tensors, {"num_steps": state.num_steps}


def state_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, int]) -> ServerOptimizerState:
    """Inverse of `state_to_tensors`."""
    first_moment, second_moment = {}, {}
    for key, tensor in tensors.items():
        if key.startswith(FIRST_MOMENT_PREFIX):
            first_moment[key.removeprefix(FIRST_MOMENT_PREFIX)] = tensor
        elif key.startswith(SECOND_MOMENT_PREFIX):
            second_moment[key.removeprefix(SECOND_MOMENT_PREFIX)] = tensor
        else:
            raise ValueError(f"not a server optimizer tensor: {key!r}")
    return ServerOptimizerState(first_moment, second_moment, int(metadata["num_steps"]))
