"""The two-stage screening on a small synthetic federation: ten clients whose honest LoRA updates share a
direction and differ by their own non-IID drift, over four decoder layers."""

from types import SimpleNamespace

import pytest
import torch

from spearfl.config import DefenseConfig
from spearfl.federated.attacks import UPDATE_ATTACKS, AttackerView
from spearfl.federated.trust import layer_of, next_reputation, robust_z, two_stage

NUM_CLIENTS, NUM_LAYERS, ATTACKERS = 10, 4, (0, 1)
SHAPES = {
    f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{part}.weight": (4, 16) if part == "A" else (16, 4)
    for layer in range(NUM_LAYERS) for part in "AB"
}
SETTINGS = DefenseConfig(screening="two_stage")
BACKDOOR_ATTACKS = ("bounded_scaling", "euclidean", "cosine")  # wrapped around a poisoned update


def tensors(seed: int, scale: float = 1.0, only_layer: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: scale * torch.randn(shape, generator=generator) * (only_layer is None or f"layers.{only_layer}." in name)
        for name, shape in SHAPES.items()
    }


GLOBAL, SHARED, BACKDOOR = tensors(1, 0.1), tensors(2), tensors(3, 3.0, only_layer=3)
# the last global update: last round's consensus, which shares part of this round's direction
LAST_STEP = {name: 0.5 * SHARED[name] + value for name, value in tensors(4, 0.5).items()}


def honest_update(client: int) -> dict:
    drift = tensors(100 + client, 0.8)
    return {name: SHARED[name] + drift[name] for name in SHAPES}


def federation(attack: str | None = None, attackers=ATTACKERS, **values) -> list[dict]:
    """Client states; the attackers send `attack` of their honest update (of a backdoored one for the constrained)."""
    attack_settings = SimpleNamespace(**({"scale": 10.0, "bound": 1.0, "cosine": 0.9, "mask_fraction": 0.05, "noise": 1.0} | values))
    updates = [honest_update(client) for client in range(NUM_CLIENTS)]
    for client in attackers if attack else ():
        honest = updates[client]
        poisoned = {name: honest[name] + BACKDOOR[name] for name in SHAPES} if attack in BACKDOOR_ATTACKS else honest
        known = AttackerView(honest, LAST_STEP, own_weight=16.0, round_weight=16.0 * NUM_CLIENTS)
        updates[client] = UPDATE_ATTACKS[attack](poisoned, known, attack_settings, torch.Generator().manual_seed(client))
    return [{name: GLOBAL[name] + update[name] for name in SHAPES} for update in updates]


def screen(states, weights=None, reputation=None, settings=SETTINGS, metrics=None, global_step=LAST_STEP):
    weights = weights or [16.0] * len(states)
    metrics = metrics or [{"trained_tokens": 900 + 10 * client} for client in range(len(states))]
    return two_stage(GLOBAL, states, weights, list(range(len(states))), metrics, reputation or {}, settings, global_step)


def categories(screening) -> list[str]:
    return [record["category"] for record in screening.records]


def test_an_honest_federation_is_trusted_in_full():
    screening = screen(federation())
    assert categories(screening) == ["trusted"] * NUM_CLIENTS
    assert screening.weights == [16.0] * NUM_CLIENTS and all(r["score"] < SETTINGS.suspicious_above for r in screening.records)


@pytest.mark.parametrize("attack", sorted(UPDATE_ATTACKS))
def test_each_attack_is_flagged_and_no_honest_client(attack):
    screening = screen(federation(attack))
    found = categories(screening)
    assert all(found[client] != "trusted" for client in ATTACKERS), (attack, screening.records[:2])
    assert all(category == "trusted" for client, category in enumerate(found) if client not in ATTACKERS)
    assert all(screening.weights[client] < 16.0 for client in ATTACKERS)


def test_a_suspicious_update_loses_its_deviating_layer_only():
    states = federation("bounded_scaling")
    screening = screen(states)
    record = screening.records[0]
    assert record["category"] == "suspicious" and record["flagged_layers"] == ["layer 3"]
    for name in SHAPES:
        if layer_of(name) == "layer 3":
            assert not torch.equal(screening.states[0][name], states[0][name])
        else:
            assert torch.equal(screening.states[0][name], states[0][name])
    assert screening.weights[0] == 16.0 * record["reputation"] == 8.0  # the first suspicious round halves it


def test_a_free_rider_is_malicious_even_among_too_few_to_score():
    states = federation()[:2] + [dict(GLOBAL)]
    screening = screen(states[:2] + [dict(GLOBAL)], metrics=[{"trained_tokens": 900}] * 3)
    assert categories(screening)[2] == "malicious" and screening.weights[2] == 0.0
    two = screen([states[0], dict(GLOBAL)])
    assert categories(two) == ["trusted", "malicious"] and two.records[0]["indicators"] == {}


def test_claimed_weight_without_the_work_behind_it_is_flagged():
    metrics = [{"trained_tokens": 900 + 10 * client} for client in range(NUM_CLIENTS)]
    metrics[4] = {"trained_tokens": 20}  # claims 16 prompts, trained 20 tokens
    screening = screen(federation(), metrics=metrics)
    assert categories(screening)[4] != "trusted" and screening.records[4]["indicators"]["work"] > SETTINGS.suspicious_above


def test_reputation_is_lost_at_once_and_earned_back_slowly():
    reputation = screen(federation("sign_flip")).reputation
    assert reputation["0"] == reputation["1"] == 0.0 and reputation["5"] == 1.0
    for rounds in range(1, 6):  # honest from now on: excluded until the reputation is back to 0.5
        screening = screen(federation(), reputation=reputation)
        reputation = screening.reputation
        assert reputation["0"] == pytest.approx(0.1 * rounds)
        assert (screening.weights[0] == 0.0) == (rounds < 5)
    assert screening.weights[0] == pytest.approx(16.0 * 0.5)


def test_reputation_rule_by_hand():
    assert next_reputation(0.95, "trusted", SETTINGS) == 1.0
    assert next_reputation(0.8, "suspicious", SETTINGS) == 0.4
    assert next_reputation(0.8, "malicious", SETTINGS) == 0.0


def test_weight_zero_clients_are_not_screened():
    states = federation()
    screening = screen(states, weights=[16.0] * 9 + [0.0])
    assert len(screening.records) == 9 and screening.weights[9] == 0.0 and "9" not in screening.reputation


def test_robust_z_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])  # median 2.5; |deviations| 1.5, .5, .5, 7.5: MAD 1
    assert robust_z(values, "high", 0.1).tolist() == pytest.approx([0, 0, 0.5 / 1.4826, 7.5 / 1.4826])
    assert robust_z(values, "low", 0.1).tolist() == pytest.approx([1.5 / 1.4826, 0.5 / 1.4826, 0, 0])
    assert robust_z(values, "both", 10.0).tolist() == pytest.approx([0.15, 0.05, 0.05, 0.75])


def test_sybil_clones_are_told_apart_by_their_similarity():
    states = federation()
    states[1], states[2] = dict(states[0]), dict(states[0])  # three devices sending one honest-looking update
    screening = screen(states)
    found = categories(screening)
    assert all(found[client] != "trusted" for client in (0, 1, 2)) and found[3:] == ["trusted"] * (NUM_CLIENTS - 3)
    assert all(record["indicators"]["similarity"] > SETTINGS.suspicious_above for record in screening.records[:3])
    assert all(record["indicators"]["similarity"] < SETTINGS.suspicious_above for record in screening.records[3:])


def test_a_disguised_free_rider_is_caught_by_what_it_adds_to_the_last_global_step():
    states = federation("disguised_free_rider")  # the last global update plus noise of its norm
    screening = screen(states)
    assert categories(screening)[:2] == ["malicious"] * 2 and screening.weights[:2] == [0.0, 0.0]
    assert all(record["indicators"]["novelty"] > SETTINGS.malicious_above for record in screening.records[:2])
    assert categories(screening)[2:] == ["trusted"] * (NUM_CLIENTS - 2)
    blind = screen(states, global_step=None)  # without the last step to compare with it keeps a share of the round
    assert "novelty" not in blind.records[0]["indicators"] and all(weight > 0 for weight in blind.weights[:2])


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_a_lost_reputation_shrinks_the_update_where_the_aggregator_ignores_weights(aggregator):
    states = federation("bounded_scaling")
    settings = DefenseConfig(screening="two_stage", aggregator=aggregator)
    screening = screen(states, settings=settings)
    record = screening.records[0]
    assert record["category"] == "suspicious" and record["reputation"] == 0.5
    for name in SHAPES:
        if layer_of(name) not in record["flagged_layers"]:  # the flagged layer is replaced, the rest shrunk
            assert torch.equal(screening.states[0][name], GLOBAL[name] + 0.5 * (states[0][name] - GLOBAL[name]))
    assert all(torch.equal(screening.states[5][name], states[5][name]) for name in SHAPES)  # trusted: as sent
    weighted = screen(states)  # the mean: the weight carries the reputation, the update stays as sent
    assert all(torch.equal(weighted.states[0][name], states[0][name]) for name in SHAPES if layer_of(name) != "layer 3")


def test_perturbed_sybils_are_still_told_apart_by_their_similarity():
    from spearfl.federated.attacks import perturbed

    states = federation()
    leader = {name: states[0][name] - GLOBAL[name] for name in SHAPES}
    for clone in (0, 1, 2):  # each clone its own noise of half the update's norm: cosine about 0.8 to each other
        noisy = perturbed(leader, 0.5, torch.Generator().manual_seed(clone))
        states[clone] = {name: GLOBAL[name] + noisy[name] for name in SHAPES}
    found = categories(screen(states))
    assert all(found[client] != "trusted" for client in (0, 1, 2)) and found[3:] == ["trusted"] * (NUM_CLIENTS - 3)
