import math

import pytest
import torch

from spearfl.config import ServerConfig
from spearfl.federated.aggregation import (
    SERVER_STRATEGIES,
    fedadam,
    fedavg,
    fedyogi,
    initial_server_state,
    lora_average_error,
    state_from_tensors,
    state_to_tensors,
    weighted_average,
)
from spearfl.io import load_tensors, save_tensors


def adapter(*values):
    return {"lora_A": torch.tensor(values, dtype=torch.float32)}


def assert_state_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name])


# FedAvg ------------------------------------------------------------------------------------


def test_weighted_average_by_hand():
    states = [adapter(1.0, 2.0), adapter(3.0, 6.0)]
    # (1 * 1 + 3 * 3) / 4 = 2.5, (1 * 2 + 3 * 6) / 4 = 5.0
    assert_state_close(weighted_average(states, [1, 3]), adapter(2.5, 5.0))


def test_weight_zero_clients_contribute_nothing():
    states = [adapter(1.0, 2.0), adapter(3.0, 6.0), adapter(100.0, 100.0), {"unread": torch.zeros(7)}]
    assert_state_close(weighted_average(states, [1, 3, 0, 0]), adapter(2.5, 5.0))


def test_all_weights_zero_means_no_update():
    global_state = adapter(0.5, 0.5)
    assert weighted_average([adapter(1.0, 1.0)], [0]) is None
    assert weighted_average([], []) is None
    assert fedavg(global_state, [adapter(1.0, 1.0), adapter(2.0, 2.0)], [0, 0]) is global_state


def test_fedavg_replaces_global_and_leaves_inputs_alone():
    global_state, client = adapter(0.0, 0.0), adapter(1.0, 2.0)
    new_global = fedavg(global_state, [client], [5])
    assert_state_close(new_global, adapter(1.0, 2.0))
    new_global["lora_A"] += 1
    assert_state_close(client, adapter(1.0, 2.0))
    assert_state_close(global_state, adapter(0.0, 0.0))


@pytest.mark.parametrize(
    "states, weights",
    [
        ([adapter(1.0)], [1, 2]),  # lengths differ
        ([adapter(1.0)], [-1]),  # negative weight
        ([adapter(1.0), adapter(1.0, 2.0)], [1, 1]),  # shapes differ
        ([adapter(1.0), {"lora_B": torch.zeros(1)}], [1, 1]),  # keys differ
    ],
)
def test_bad_inputs_raise(states, weights):
    with pytest.raises(ValueError):
        weighted_average(states, weights)


# LoRA averaging gap ------------------------------------------------------------------------

Q, V = "layers.0.q_proj", "layers.0.v_proj"


def lora_module(module, a, b):
    """One module's factors from nested lists: A [r, in], B [out, r]."""
    return {f"{module}.lora_A.weight": torch.as_tensor(a), f"{module}.lora_B.weight": torch.as_tensor(b)}


def only_b(state):
    return {name: tensor for name, tensor in state.items() if "lora_B" in name}


def test_lora_average_error_of_two_scalar_clients_by_hand():
    states = [lora_module(Q, [[1.0]], [[2.0]]), lora_module(Q, [[3.0]], [[4.0]])]
    # mean(B) mean(A) = 3 * 2 = 6; mean(B A) = (2 + 12) / 2 = 7; |6 - 7| / 7
    assert lora_average_error(states, [1, 1]) == pytest.approx(1 / 7, rel=1e-12)


def test_lora_average_error_pools_modules_and_weighs_clients():
    first = lora_module(Q, [[1.0]], [[2.0]]) | lora_module(V, [[1.0, 2.0]], [[1.0], [0.0]])
    second = lora_module(Q, [[3.0]], [[4.0]]) | lora_module(V, [[1.0, 2.0]], [[5.0], [0.0]])
    # weights 1 and 3: fractions 1/4, 3/4
    # q: mean A = 2.5, mean B = 3.5, mean(B) mean(A) = 8.75; mean(B A) = 0.5 + 9 = 9.5; difference 0.75
    # v: A shared, so no difference; mean B = [[4], [0]], mean(B A) = [[4, 8], [0, 0]], squared norm 16 + 64 = 80
    expected = 0.75 / math.sqrt(9.5**2 + 80)
    assert lora_average_error([first, second], [1, 3]) == pytest.approx(expected, rel=1e-12)


def test_lora_average_error_with_two_by_two_factors_by_hand():
    identity, swap = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]
    states = [lora_module(Q, identity, identity), lora_module(Q, swap, identity)]
    # B = I for both clients: mean(B) mean(A) = mean(A) = mean(B A), no gap
    assert lora_average_error(states, [1, 1]) == 0.0
    states = [lora_module(Q, identity, identity), lora_module(Q, swap, swap)]
    # mean A = mean B = [[0.5, 0.5], [0.5, 0.5]], their product the same; mean(B A) = (I + swap swap) / 2 = I
    # difference [[-0.5, 0.5], [0.5, -0.5]]: norm 1; norm of I: sqrt 2
    assert lora_average_error(states, [1, 1]) == pytest.approx(1 / math.sqrt(2), rel=1e-12)


def test_lora_average_error_is_exactly_zero_when_the_clients_share_a():
    states = [lora_module(Q, [[0.3, -1.7]], [[2.0], [0.1]]), lora_module(Q, [[0.3, -1.7]], [[-4.0], [6.0]])]
    assert lora_average_error(states, [1, 2]) == 0.0


def test_lora_average_error_matches_the_products_formed_directly():
    generator = torch.Generator().manual_seed(0)
    weights = [1.0, 2.0, 4.0]
    states = [lora_module(Q, torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)) for _ in weights]
    fractions = [weight / sum(weights) for weight in weights]
    a, b = [s[f"{Q}.lora_A.weight"] for s in states], [s[f"{Q}.lora_B.weight"] for s in states]
    mean_product = sum(f * b_k @ a_k for f, a_k, b_k in zip(fractions, a, b))  # [5, 7]
    product_of_means = sum(f * b_k for f, b_k in zip(fractions, b)) @ sum(f * a_k for f, a_k in zip(fractions, a))
    expected = float((product_of_means - mean_product).norm() / mean_product.norm())
    assert lora_average_error(states, weights) == pytest.approx(expected, rel=1e-5)


def test_lora_average_error_is_none_without_two_clients_or_pairs():
    first, second = lora_module(Q, [[1.0]], [[2.0]]), lora_module(Q, [[3.0]], [[4.0]])
    assert lora_average_error([first], [1]) is None
    assert lora_average_error([first, second], [1, 0]) is None
    assert lora_average_error([only_b(first), only_b(second)], [1, 1]) is None  # B without its A
    assert lora_average_error([adapter(1.0), adapter(2.0)], [1, 1]) is None  # no LoRA names at all
    zero_b = [lora_module(Q, [[1.0]], [[0.0]]), lora_module(Q, [[3.0]], [[0.0]])]
    assert lora_average_error(zero_b, [1, 1]) is None  # mean(B A) = 0: no relative error


def test_lora_average_error_leaves_weight_zero_clients_out():
    first, second = lora_module(Q, [[1.0]], [[2.0]]), lora_module(Q, [[3.0]], [[4.0]])
    stale = lora_module(Q, [[100.0]], [[-50.0]])
    assert lora_average_error([first, stale, second, {"unread": torch.zeros(3)}], [1, 0, 1, 0]) == pytest.approx(1 / 7)


def test_fedavg_of_b_under_a_shared_a_is_the_mean_update_exactly():
    """FFA-LoRA: clients send B only; with the common A, the averaged B gives exactly the average of B_k A."""
    shared_a = [[1.0, -2.0, 0.5]]  # [r = 1, in = 3]
    shared = {f"{Q}.lora_A.weight": torch.tensor(shared_a)}
    states = [only_b(lora_module(Q, shared_a, [[2.0], [-1.0]])), only_b(lora_module(Q, shared_a, [[6.0], [3.0]]))]
    average = fedavg(states[0], states, [1, 3])
    a = shared[f"{Q}.lora_A.weight"]
    mean_update = 0.25 * states[0][f"{Q}.lora_B.weight"] @ a + 0.75 * states[1][f"{Q}.lora_B.weight"] @ a  # [2, 3]
    assert torch.equal(average[f"{Q}.lora_B.weight"] @ a, mean_update)
    assert lora_average_error(states, [1, 3], shared) == 0.0
    assert lora_average_error(states, [1, 3]) is None  # without the shared A there is no pair to measure


# FedAdam / FedYogi -------------------------------------------------------------------------

SETTINGS = ServerConfig(server_lr=1.0, beta1=0.5, beta2=0.75, tau=0.5)


def clients_averaging_to(values):
    """Two clients (weights 1 and 3) whose weighted average is `values`, plus a skipped client."""
    target = torch.tensor(values, dtype=torch.float32)
    states = [{"lora_A": target - 0.75}, {"lora_A": target + 0.25}, adapter(*([9.0] * len(values)))]
    return states, [1, 3, 0]


def run_two_steps(strategy):
    """Step 1: delta = [1, -2] from global [0, 0]. Step 2: delta = [1, 0.5] from the new global."""
    global_state, server_state = adapter(0.0, 0.0), initial_server_state()
    states, weights = clients_averaging_to([1.0, -2.0])
    first_global, server_state = strategy(global_state, states, weights, server_state, SETTINGS)
    states, weights = clients_averaging_to((first_global["lora_A"] + torch.tensor([1.0, 0.5])).tolist())
    second_global, server_state = strategy(first_global, states, weights, server_state, SETTINGS)
    return first_global, second_global, server_state


def test_fedadam_two_steps_by_hand():
    first_global, second_global, server_state = run_two_steps(fedadam)
    # Step 1: m = 0.5 * [1, -2] = [0.5, -1]; v = 0.25 * [1, 4] = [0.25, 1]; sqrt v = [0.5, 1]
    # step size = 1 * sqrt(1 - 0.75) / (1 - 0.5) = 1; new = [0.5 / (0.5 + 0.5), -1 / (1 + 0.5)]
    assert_state_close(first_global, adapter(0.5, -2 / 3))
    # Step 2: m = 0.5 * [0.5, -1] + 0.5 * [1, 0.5] = [0.75, -0.25]
    # v = 0.75 * [0.25, 1] + 0.25 * [1, 0.25] = [0.4375, 0.8125]
    step_size = math.sqrt(1 - 0.75**2) / (1 - 0.5**2)
    expected = adapter(
        0.5 + step_size * 0.75 / (math.sqrt(0.4375) + 0.5),
        -2 / 3 + step_size * -0.25 / (math.sqrt(0.8125) + 0.5),
    )
    assert_state_close(second_global, expected)
    assert server_state.num_steps == 2
    assert_state_close(server_state.first_moment, adapter(0.75, -0.25))
    assert_state_close(server_state.second_moment, adapter(0.4375, 0.8125))


def test_fedyogi_two_steps_by_hand():
    first_global, second_global, server_state = run_two_steps(fedyogi)
    # Step 1: v = 0 - 0.25 * [1, 4] * sign(0 - [1, 4]) = [0.25, 1]: same as Adam; step size 1, no correction
    assert_state_close(first_global, adapter(0.5, -2 / 3))
    # Step 2: delta^2 = [1, 0.25]; sign(v - delta^2) = [-1, +1]
    # v = [0.25 + 0.25 * 1, 1 - 0.25 * 0.25] = [0.5, 0.9375]: grows where delta^2 > v, shrinks where below
    expected = adapter(
        0.5 + 0.75 / (math.sqrt(0.5) + 0.5),
        -2 / 3 + -0.25 / (math.sqrt(0.9375) + 0.5),
    )
    assert_state_close(second_global, expected)
    assert server_state.num_steps == 2
    assert_state_close(server_state.second_moment, adapter(0.5, 0.9375))


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi"])
def test_no_update_keeps_global_and_server_state(name):
    global_state = adapter(0.5, 0.5)
    _, server_state = fedadam(global_state, [adapter(1.0, 0.0)], [1], initial_server_state(), SETTINGS)
    new_global, new_server_state = SERVER_STRATEGIES[name](
        global_state, [adapter(1.0, 1.0)], [0], server_state, SETTINGS
    )
    assert new_global is global_state
    assert new_server_state is server_state


def test_adaptive_step_leaves_inputs_alone():
    global_state, client = adapter(0.0, 0.0), adapter(1.0, 2.0)
    _, server_state = fedadam(global_state, [client], [1], initial_server_state(), SETTINGS)
    moments = {name: tensor.clone() for name, tensor in server_state.first_moment.items()}
    fedyogi(global_state, [client], [1], server_state, SETTINGS)
    assert_state_close(global_state, adapter(0.0, 0.0))
    assert_state_close(server_state.first_moment, moments)


def test_registry_has_one_signature():
    assert set(SERVER_STRATEGIES) == {"fedavg", "fedadam", "fedyogi"}
    server_state = initial_server_state()
    strategy = SERVER_STRATEGIES["fedavg"]
    new_global, new_server_state = strategy(adapter(0.0), [adapter(2.0)], [1], server_state, SETTINGS)
    assert_state_close(new_global, adapter(2.0))
    assert new_server_state is server_state


def test_server_state_survives_a_restart(tmp_path):
    first_global, _, server_state = run_two_steps(fedyogi)
    tensors, metadata = state_to_tensors(server_state)
    save_tensors(tmp_path / "server_state.safetensors", tensors)
    restored = state_from_tensors(load_tensors(tmp_path / "server_state.safetensors"), metadata)
    assert restored.num_steps == 2
    assert_state_close(restored.first_moment, server_state.first_moment)
    assert_state_close(restored.second_moment, server_state.second_moment)
    # the next step from the restored state equals the next step without the restart
    states, weights = clients_averaging_to([0.0, 0.0])
    uninterrupted, _ = fedyogi(first_global, states, weights, server_state, SETTINGS)
    resumed, _ = fedyogi(first_global, states, weights, restored, SETTINGS)
    assert_state_close(resumed, uninterrupted)


def test_empty_server_state_round_trips_and_unknown_keys_raise():
    tensors, metadata = state_to_tensors(initial_server_state())
    assert tensors == {} and state_from_tensors(tensors, metadata) == initial_server_state()
    with pytest.raises(ValueError):
        state_from_tensors({"lora_A": torch.zeros(1)}, {"num_steps": 1})


@pytest.mark.parametrize("field, value", [("server_lr", 0.0), ("beta1", 1.0), ("beta2", -0.1), ("tau", 0.0)])
def test_settings_are_validated(field, value):
    with pytest.raises(ValueError):
        ServerConfig(**{field: value})
