"""Differential privacy that holds against the server: a device's local noise cannot be rebuilt from the config,
central DP's noise and client sampling are nobody's to predict, and settings that void the accounted epsilon
are refused."""

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import make_config

from spearfl.algorithms.base import REPORTED_METRICS, ClientResult, ClientRound
from spearfl.config import ConfigError, PrivacyConfig
from spearfl.errors import UserError
from spearfl.federated.privacy import central_mean, local_epsilon, local_settings, released_row
from spearfl.federated.robust import clipped, trimmed_mean
from spearfl.federated.trust import two_stage
from spearfl.runtime.client import device_config, run_client, work_order_config
from spearfl.runtime.server import choose_clients
from spearfl.seeds import derive_seed

SIZE = 20_000


def trained(context, work) -> ClientResult:
    """A client update of norm about 8 (clipped to C), with every counter a reply carries."""
    update = 1e-4 * torch.arange(SIZE, dtype=torch.float32)
    return ClientResult({"w": work.global_state["w"] + update}, 4.0, {key: 3 for key in REPORTED_METRICS} | {"prompts": 4})


def test_the_server_cannot_rebuild_a_devices_local_noise():
    """The server holds the run config: with noise drawn from the seed it derived for the device, it would take
    the noise back out and read the clipped update to float32 rounding."""
    config = make_config("privacy.mode=local", "privacy.noise_multiplier=5", "privacy.clip_norm=1.0", "seed=3")
    work = ClientRound(1, 4, [], {"w": torch.zeros(SIZE)}, 0.01, config.seed)
    sent = run_client(trained, SimpleNamespace(config=config), work).state["w"].double()
    generator = torch.Generator().manual_seed(derive_seed(config.seed, 4, 1, "local-dp"))
    rebuilt = torch.randn(SIZE, generator=generator, dtype=torch.float64) * 5.0  # z C
    truth = clipped({"w": trained(None, work).state["w"]}, 1.0)[0]["w"].double()
    # unpredictable noise leaves the server off by the difference of two independent noises, norm about
    # sqrt(2) z C sqrt(SIZE) = 1000 (relative spread 1/sqrt(2 SIZE) = 0.005); rebuilt, it would be off by 1e-5
    assert float((sent - rebuilt - truth).norm()) == pytest.approx(math.sqrt(2) * 5.0 * math.sqrt(SIZE), rel=0.05)


def test_a_device_releases_only_public_counts_beside_its_noised_update():
    """Under local DP the weight is the prompts asked for and no counter travels; a round with nothing to learn
    from still sends noise, so that not even that is released."""
    config = make_config("privacy.mode=local", "client.prompts_per_round=16")
    work = ClientRound(0, 2, [], {"w": torch.zeros(SIZE)}, 0.01, config.seed)
    result = run_client(trained, SimpleNamespace(config=config), work)
    assert result.weight == 16 and result.metrics == {key: 0 for key in REPORTED_METRICS} | {"prompts": 16}
    idle = run_client(lambda context, work: ClientResult(work.global_state, 0.0, trained(None, work).metrics), SimpleNamespace(config=config), work)
    assert idle.weight == 16 and float(idle.state["w"].norm()) > 0.5 * math.sqrt(SIZE)  # z C sqrt(SIZE), z = C = 1


def test_local_dp_is_the_devices_floor_and_a_work_order_only_tightens_it():
    own = PrivacyConfig(mode="local", noise_multiplier=2.0, clip_norm=0.5, epsilon_budget=8.0)
    assert local_settings(own, PrivacyConfig(mode="none")) == own
    assert local_settings(own, None) == own
    weaker = local_settings(own, PrivacyConfig(mode="local", noise_multiplier=0.1, clip_norm=5.0))
    assert (weaker.noise_multiplier, weaker.clip_norm) == (2.0, 0.5)
    stronger = local_settings(own, PrivacyConfig(mode="local", noise_multiplier=3.0, clip_norm=0.25))
    assert (stronger.noise_multiplier, stronger.clip_norm) == (3.0, 0.25)
    assert local_settings(PrivacyConfig(), PrivacyConfig(mode="local", noise_multiplier=4.0)).noise_multiplier == 4.0
    device = make_config("privacy.mode=local", "privacy.noise_multiplier=2", "privacy.epsilon_budget=8")
    server = make_config("privacy.mode=local", "privacy.noise_multiplier=0.01", "privacy.epsilon_budget=1e9")
    applied = device_config(work_order_config(server), device).privacy
    assert (applied.mode, applied.noise_multiplier, applied.epsilon_budget) == ("local", 2.0, 8.0)
    assert device_config(work_order_config(make_config()), device).privacy.mode == "local"


@pytest.mark.parametrize(
    "section, value, named",
    [
        ("feedback", {"provider": "python", "function": "os:system"}, "feedback"),
        ("data", {"dataset": "jsonl:/etc/passwd"}, "data"),
        ("live", {"min_interactions": 1}, "live"),
        ("attacks", [{"clients": [0], "update": "sign_flip"}], "attacks"),
        ("server", {"upload_encoding": "float32", "rounds": 3}, "server.rounds"),
    ],
)
def test_a_work_order_may_not_set_what_is_the_devices_own(section, value, named):
    order = work_order_config(make_config()) | {section: value}
    with pytest.raises(UserError, match=f"the work order sets {named}"):
        device_config(order, make_config())


def test_local_releases_compose_as_gaussian_mechanisms_of_half_the_multiplier():
    assert local_epsilon([], 1e-5) == 0.0
    assert local_epsilon([2.0, 2.0], 1e-5) < local_epsilon([2.0, 2.0, 2.0], 1e-5) < local_epsilon([2.0, 2.0, 1.0], 1e-5)


# ------------------------------------------------------------------------------------------------ central DP


def test_central_dp_draws_its_clients_and_noise_where_the_config_cannot_tell():
    private = make_config("privacy.mode=central", "data.num_clients=50", "server.clients_per_round=3")
    draws = {tuple(choose_clients(private, 4)) for _ in range(3)}  # three equal draws: probability (1 / 19,600)^2
    assert len(draws) > 1 and all(len(set(draw)) == 3 and all(0 <= c < 50 for c in draw) for draw in draws)
    plain = make_config("data.num_clients=50", "server.clients_per_round=3")
    assert choose_clients(plain, 4) == choose_clients(plain, 4)  # runs without DP stay reproducible
    zero = {"w": torch.zeros(1000, dtype=torch.float64)}
    first, _ = central_mean(zero, [zero], [1.0], 1, private.privacy)
    again, _ = central_mean(zero, [zero], [1.0], 1, private.privacy)
    assert not torch.equal(first["w"], again["w"])


def test_two_stage_screening_lets_one_client_move_anothers_share():
    """Why central DP refuses the screening: its 2C bound assumes a client moves only its own term."""
    settings = make_config().defense
    direction = torch.linspace(1.0, 2.0, 64, dtype=torch.float64)

    def weights(first_norm: float) -> list[float]:
        states = [{"w": norm * direction} for norm in (first_norm, 10.0, 1.0)]  # client 1 sends the large update
        return two_stage({"w": torch.zeros(64, dtype=torch.float64)}, states, [4.0] * 3, [0, 1, 2], [{}] * 3, {}, settings).weights

    # only client 0's update differs: next to a small one client 1's update is the outlier, next to a large one not
    assert weights(1.0)[1] == 0.0 and weights(10.0)[1] == 4.0


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["defense.screening=two_stage"], "the sensitivity 2C the accountant assumes no longer holds"),
        (["live.round_period_seconds=30"], "not a uniform sample of K of N"),
        (["defense.aggregator=median"], "has no such bound"),
    ],
)
def test_central_dp_refuses_what_voids_its_epsilon(overrides, words):
    with pytest.raises(ConfigError, match=words):
        make_config("privacy.mode=central", "data.num_clients=10", "server.clients_per_round=5", *overrides)
    make_config("privacy.mode=local", "data.num_clients=10", "server.clients_per_round=5", *overrides[:1])  # local DP reads noised updates only


def test_a_central_dp_history_row_holds_no_figure_of_a_single_update():
    row = {
        "round": 3, "lr": 0.1, "clients": [{"client": 4, "weight": 7.0, "metrics": {"first_try_correct": 2}}],
        "online": {"first_try_accuracy": 0.5}, "lora_average_error": 0.1, "server_seconds": 0.2,
        "aggregation": {"clipped": 1, "asked": 2}, "privacy": {"epsilon": 3.0, "delta": 1e-5},
        "rejected": [{"client": 6, "reason": "weight 17 exceeds the 16 prompts asked for"}],
    }
    released = released_row(row)
    assert released["clients"] == [{"client": 4}] and released["aggregation"] == {"asked": 2}
    assert "online" not in released and "lora_average_error" not in released and released["privacy"] == row["privacy"]
    assert released["rejected"] == [{"client": 6, "reason": "dropped"}]


# ------------------------------------------------------------------------------------------------ robust combiners


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["defense.aggregator=trimmed_mean", "server.clients_per_round=3"], "trims floor"),
        (["defense.aggregator=trimmed_mean", "server.clients_per_round=4"], "it is the plain mean"),
        (["defense.aggregator=multi_krum", "server.clients_per_round=4"], "can assume no malicious client"),
    ],
)
def test_a_robust_combiner_that_would_be_the_plain_mean_is_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        make_config("data.num_clients=10", *overrides)
    make_config("data.num_clients=10", overrides[0], "server.clients_per_round=5")


def test_a_round_too_small_for_its_combiner_says_so():
    settings = make_config("defense.aggregator=trimmed_mean", "data.num_clients=10", "server.clients_per_round=5").defense
    states = [{"w": torch.full((3,), float(k))} for k in range(3)]  # 2 of the 5 asked did not answer
    _, notes = trimmed_mean({"w": torch.zeros(3)}, states, [1.0] * 3, settings)
    assert notes["trimmed_each_end"] == 0 and "nothing trimmed" in notes["degenerate"]


def test_clipping_holds_the_bound_in_float32():
    """Scaling float32 values by bound / norm rounds each of them; the rounded vector's norm may exceed the bound."""
    vector = torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 3  # a case where it does, by 3e-8
    bounded, was_clipped = clipped({"w": vector}, 1.0)
    assert was_clipped and bounded["w"].dtype == torch.float32
    assert float(bounded["w"].double().norm()) <= 1.0
