from types import SimpleNamespace

import pytest
import torch

from spearfl.federated.attacks import (
    AttackerView,
    bounded_scaling,
    cosine,
    disguised_free_rider,
    euclidean,
    free_rider,
    gaussian,
    model_replacement,
    neurotoxin_mask,
    perturbed,
    projected,
    scaling,
    sign_flip,
)
from spearfl.federated.robust import flatten


def update(*values):
    return {"a": torch.tensor(values[:2], dtype=torch.float64), "b": torch.tensor(values[2:], dtype=torch.float64)}


def settings(**values):
    return SimpleNamespace(**({"scale": 1.0, "bound": 1.0, "cosine": 0.9, "mask_fraction": 0.25, "noise": 1.0} | values))


def sent(attack, poisoned, honest, known=None, **values):
    known = known or AttackerView(honest)
    return flatten(attack(poisoned, known, settings(**values), torch.Generator().manual_seed(0)))


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


def test_model_replacement_scales_by_the_rounds_weight_over_its_own():
    # claims 4 of a round it puts at 4 + 3 clients x 16 prompts = 52: gamma 13
    known = AttackerView(HONEST, own_weight=4.0, round_weight=52.0)
    assert sent(model_replacement, POISONED, HONEST, known).tolist() == [39.0, 0.0, 0.0, 52.0]
    equal = AttackerView(HONEST, own_weight=16.0, round_weight=5 * 16.0)  # five equal clients: gamma n = 5
    assert sent(model_replacement, POISONED, HONEST, equal).tolist() == [15.0, 0.0, 0.0, 20.0]


STEP = update(0.0, 3.0, 4.0, 0.0)  # the last global update, norm 5


def test_a_disguised_free_rider_sends_the_last_global_update_and_noise_of_its_norm():
    known = AttackerView(HONEST, global_step=STEP)
    vector = sent(disguised_free_rider, POISONED, HONEST, known, noise=0.4)
    noise = vector - flatten(STEP)
    assert float(noise.norm()) == pytest.approx(0.4 * 5.0, rel=1e-12)  # float64 throughout
    assert sent(disguised_free_rider, POISONED, HONEST, known, noise=0.0).tolist() == flatten(STEP).tolist()
    assert sent(disguised_free_rider, POISONED, HONEST, AttackerView(HONEST)).tolist() == [0.0] * 4  # no step seen yet


def test_the_neurotoxin_mask_leaves_the_largest_coordinates_of_the_global_update_alone():
    mask = neurotoxin_mask(update(0.1, -5.0, 0.2, 0.3), 0.25)  # one of four masked: the largest in magnitude
    assert flatten(mask).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert flatten(neurotoxin_mask(update(0.1, -5.0, 0.2, 0.3), 0.5)).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert flatten(neurotoxin_mask(update(0.1, -5.0, 0.2, 0.3), 0.0)).tolist() == [1.0] * 4


def test_neurotoxin_projects_onto_the_mask_then_into_the_ball():
    mask = update(1.0, 0.0, 1.0, 1.0)
    inside = flatten(projected(update(3.0, 7.0, 0.0, 4.0), mask, radius=10.0))
    assert inside.tolist() == [3.0, 0.0, 0.0, 4.0]  # masked, norm 5 within 10: not scaled
    pulled = flatten(projected(update(3.0, 7.0, 0.0, 4.0), mask, radius=2.5))
    assert pulled.tolist() == pytest.approx([1.5, 0.0, 0.0, 2.0], rel=1e-15)


def test_a_perturbed_clone_adds_noise_of_its_share_of_the_norm():
    noisy = flatten(perturbed(POISONED, 0.2, torch.Generator().manual_seed(3)))
    assert float((noisy - flatten(POISONED)).norm()) == pytest.approx(0.2 * 5.0, rel=1e-12)
    other = flatten(perturbed(POISONED, 0.2, torch.Generator().manual_seed(4)))
    assert not torch.equal(noisy, other)  # every clone its own noise
