import math

import pytest
import torch

from spearfl.config import PrivacyConfig
from spearfl.federated.privacy import (
    affordable_rounds,
    central_mean,
    clipped,
    epsilon_after,
    noised_locally,
)


def adapter(*values):
    return {"w": torch.tensor(values, dtype=torch.float64)}


def test_clipping_by_hand():
    update, was = clipped(adapter(3.0, 4.0), 1.0)
    assert update["w"].tolist() == pytest.approx([0.6, 0.8]) and was
    update, was = clipped(adapter(0.3, 0.4), 1.0)
    assert update["w"].tolist() == [0.3, 0.4] and not was


def test_central_mean_divides_by_the_clients_asked_and_clips_each():
    settings = PrivacyConfig(mode="central", clip_norm=1.0, noise_multiplier=1e-9)
    states = [adapter(4.0, 4.0), adapter(1.3, 0.4), adapter(1.0, 0.0)]  # updates (3, 4) norm 5, (.3, .4), (0, 0)
    combined, notes = central_mean(adapter(1.0, 0.0), states, [1.0, 1.0, 0.0], 4, settings)
    # (clip((3, 4)) + (.3, .4)) / 4 asked, one of them silent and one held back
    assert combined["w"].tolist() == pytest.approx([1.0 + 0.9 / 4, 1.2 / 4]) and notes == {"clipped": 1, "asked": 4}
    with pytest.raises(ValueError, match="factors"):
        central_mean(adapter(0.0), [adapter(1.0)], [2.0], 1, settings)


def test_central_noise_has_the_calibrated_spread():
    settings = PrivacyConfig(mode="central", clip_norm=2.0, noise_multiplier=0.8)
    zero = {"w": torch.zeros(40_000, dtype=torch.float64)}
    combined, _ = central_mean(zero, [zero, zero], [1.0, 1.0], 2, settings)
    # z C / K. The sample std of n = 40,000 draws has relative standard error 1/sqrt(2n) = 0.0035: rel 0.02 is 5.7 of
    # them (a correct noise fails with probability about 1e-8), and a noise off by a factor K or sqrt(2) fails
    assert float(combined["w"].std()) == pytest.approx(0.8 * 2.0 / 2, rel=0.02)


def test_local_noise_clips_then_noises():
    settings = PrivacyConfig(mode="local", clip_norm=1.0, noise_multiplier=0.5)
    global_state = {"w": torch.zeros(40_000, dtype=torch.float64)}
    state = {"w": torch.full((40_000,), 1.0, dtype=torch.float64)}  # norm 200: clipped to 1
    sent = noised_locally(state, global_state, settings)
    # standard errors over 40,000 draws of std 0.5: the mean's 0.0025 (abs 0.01 is 4 of them, while an unclipped
    # update would move it by 1), the std's relative 0.0035 (rel 0.02 is 5.7 of them)
    assert float(sent["w"].mean()) == pytest.approx(1 / 200, abs=0.01) and float(sent["w"].std()) == pytest.approx(0.5, rel=0.02)


def gaussian_epsilon_by_hand(sigma: float, rounds: int, delta: float) -> float:
    """RDP of the Gaussian mechanism, alpha / (2 sigma^2) per round, converted at the best order (Mironov 2017),
    with the conversion of Balle et al. 2020 that dp-accounting applies."""
    best = math.inf
    for alpha in [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]:
        rdp = rounds * alpha / (2 * sigma**2)
        epsilon = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, epsilon)
    return best


def test_local_epsilon_is_the_gaussian_mechanism_of_half_the_multiplier():
    settings = PrivacyConfig(mode="local", noise_multiplier=4.0, delta=1e-5)
    # rel 0.02: the hand conversion takes the best of its own grid of orders, dp-accounting the best of another
    assert epsilon_after(10, settings, 4, 2) == pytest.approx(gaussian_epsilon_by_hand(2.0, 10, 1e-5), rel=0.02)


def test_sampling_fewer_clients_spends_less_and_every_round_spends_more():
    settings = PrivacyConfig(mode="central", noise_multiplier=1.0)
    assert epsilon_after(0, settings, 100, 10) == 0.0
    sampled, everyone = epsilon_after(5, settings, 100, 10), epsilon_after(5, settings, 100, 100)
    assert sampled < everyone
    assert epsilon_after(6, settings, 100, 10) > sampled


def test_affordable_rounds_stop_within_the_budget():
    settings = PrivacyConfig(mode="central", noise_multiplier=1.0)
    budget = epsilon_after(3, settings, 20, 5)
    assert affordable_rounds(settings.model_copy(update={"epsilon_budget": budget}), 20, 5, 50) == 3
    assert affordable_rounds(settings.model_copy(update={"epsilon_budget": budget * 0.999}), 20, 5, 50) == 2
    assert affordable_rounds(settings, 20, 5, 50) == 50  # no budget
