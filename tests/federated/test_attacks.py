from types import SimpleNamespace

import pytest
import torch

from spearfl.federated.attacks import (
    bounded_scaling,
    cosine,
    euclidean,
    free_rider,
    gaussian,
    neurotoxin,
    scaling,
    sign_flip,
)
from spearfl.federated.robust import flatten


def update(*values):
    return {"a": torch.tensor(values[:2], dtype=torch.float64), "b": torch.tensor(values[2:], dtype=torch.float64)}


def settings(**values):
    return SimpleNamespace(**({"scale": 1.0, "bound": 1.0, "cosine": 0.9, "mask_fraction": 0.25} | values))


def sent(attack, poisoned, honest, **values):
    return flatten(attack(poisoned, honest, settings(**values), torch.Generator().manual_seed(0)))


POISONED, HONEST = update(3.0, 0.0, 0.0, 4.0), update(1.0, 0.0, 0.0, 0.0)  # norms 5 and 1


def test_sign_flip_scaling_and_free_rider_by_hand():
    assert sent(sign_flip, POISONED, HONEST, scale=2.0).tolist() == [-6.0, 0.0, 0.0, -8.0]
    assert sent(scaling, POISONED, HONEST, scale=10.0).tolist() == [30.0, 0.0, 0.0, 40.0]
    assert sent(free_rider, POISONED, HONEST).tolist() == [0.0] * 4


def test_gaussian_has_the_scaled_honest_norm_and_repeats_with_its_seed():
    noise = sent(gaussian, POISONED, update(3.0, 4.0, 0.0, 0.0), scale=2.0)
    assert float(noise.norm()) == pytest.approx(10.0)
    assert torch.equal(noise, sent(gaussian, POISONED, update(3.0, 4.0, 0.0, 0.0), scale=2.0))


def test_bounded_scaling_reaches_the_bound():
    assert sent(bounded_scaling, POISONED, HONEST, bound=2.0).tolist() == pytest.approx([1.2, 0.0, 0.0, 1.6])  # norm 2


def test_euclidean_pulls_within_the_radius_of_the_honest_update():
    # offset from honest (2, 0, 0, 4) has norm sqrt(20); radius 1: honest + offset / sqrt(20)
    vector = sent(euclidean, POISONED, HONEST, bound=1.0)
    assert float((vector - flatten(HONEST)).norm()) == pytest.approx(1.0)
    assert vector.tolist() == pytest.approx([1 + 2 / 20**0.5, 0.0, 0.0, 4 / 20**0.5])
    inside = update(1.1, 0.0, 0.0, 0.1)
    assert sent(euclidean, inside, HONEST, bound=1.0).tolist() == pytest.approx(flatten(inside).tolist())


def test_cosine_turns_towards_the_honest_direction_at_the_poisoned_norm():
    vector = sent(cosine, POISONED, HONEST, cosine=0.9)  # cos(poisoned, honest) = 0.6 before
    assert float(vector @ flatten(HONEST)) / float(vector.norm()) == pytest.approx(0.9, abs=1e-6)
    assert float(vector.norm()) == pytest.approx(5.0)
    assert sent(cosine, POISONED, HONEST, cosine=0.5).tolist() == pytest.approx(flatten(POISONED).tolist())


def test_neurotoxin_zeroes_the_coordinates_honest_training_moves_most():
    honest = update(0.1, 5.0, 0.2, 0.3)  # one of four coordinates masked: the second
    assert sent(neurotoxin, update(1.0, 2.0, 3.0, 4.0), honest).tolist() == [1.0, 0.0, 3.0, 4.0]
