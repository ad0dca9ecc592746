"""A device's rounds on its store: stale answers skipped and counted, claims consumed only on acceptance, a failed
round releasing what it claimed, and work orders for another model refused."""

import contextlib
import math
import os

import numpy as np
import pytest
import torch
from helpers import (
    encode_task,
    make_config,
    make_context,
    multiple_choice,
    single_thread,
    tiny_lora_model,
)

import spearfl.serve.rounds
from spearfl.federated.privacy import PrivacyBudgetSpent, local_epsilon
from spearfl.runtime.client import work_order_config
from spearfl.data.store import Attempt, InteractionStore
from spearfl.errors import UserError
from spearfl.lm.generation import SamplingSettings
from spearfl.lm.models import get_adapter_state
from spearfl.serve.engine import AnswerEngine
from spearfl.serve.rounds import DeviceRounds

FRUIT = multiple_choice("t/fruit", "Which of these is a fruit?", ("apple", "rock", "car"), gold=0)


DEVICE = ("live.min_interactions=2", "live.max_staleness=1", "spear.local_steps=1")


@contextlib.contextmanager
def device_with(tokenizer, tmp_path, *overrides: str, ledger_path=None, personal_path=None):
    """A device with five judged interactions, answered by adapter versions 0, 0, 3, 3, 4; its config is DEVICE
    with `overrides`, and it keeps its privacy ledger at `ledger_path`, its personal adapter at `personal_path`."""
    with single_thread():
        model = tiny_lora_model(tokenizer)
        config = make_config(*DEVICE, *overrides)
        context = make_context(model, tokenizer, config)
        engine = AnswerEngine(model, tokenizer, SamplingSettings(4, 1.0, 1.0, 4))
        store = InteractionStore(tmp_path / "device.sqlite")
        prompt, answer = encode_task(tokenizer, FRUIT), tokenizer.encode("Answer: apple\n", add_special_tokens=False)
        ids = {}
        for version in (0, 0, 3, 3, 4):  # answered by these adapter versions, every one judged right
            interaction = store.add(FRUIT.question, Attempt(prompt, "Answer: apple", answer, version, "stop"), list(FRUIT.options))
            store.judge(interaction, 0, True)
            ids.setdefault(version, []).append(interaction)
        try:
            yield DeviceRounds(context, store, engine, ledger_path=ledger_path, personal_path=personal_path), config, ids
        finally:
            engine.close()
            store.close()


@pytest.fixture
def device(tokenizer, tmp_path):
    with device_with(tokenizer, tmp_path) as made:
        yield made


def work_order(config, round_index, model, nonce=""):
    arrays = {name: tensor.numpy() for name, tensor in get_adapter_state(model).items()}
    request = {"config": work_order_config(config), "client_id": 0, "round_index": round_index, "lr": 0.01, "nonce": nonce}
    return arrays, {"request": request}


def test_stale_answers_are_skipped_and_only_accepted_rounds_consume(device):
    rounds, config, ids = device
    with single_thread():
        payload, result = rounds.train_arrays(*work_order(config, 5, rounds.context.model))  # global adapter: version 4
    assert result["metrics"]["pending"] == 5 and result["metrics"]["stale_skipped"] == 2  # versions 0 are over 1 behind
    assert result["weight"] == 3 and payload and rounds.engine.adapter_version == 4
    assert rounds.store.claimed_rounds() == [5] and rounds.store.count_pending() == 2
    assert rounds.settle(5, accepted=True) == 3
    consumed = {i.id: i.consumed_round for i in rounds.store.recent()}
    assert {consumed[i] for i in ids[3] + ids[4]} == {5} and {consumed[i] for i in ids[0]} == {None}


def test_a_rejected_or_failed_round_releases_its_claims(device, monkeypatch):
    rounds, config, _ = device
    with single_thread():
        rounds.train_arrays(*work_order(config, 5, rounds.context.model))
        rounds.settle(5, accepted=False)
        assert rounds.store.count_pending() == 5 and rounds.store.claimed_rounds() == []
        monkeypatch.setattr(spearfl.serve.rounds, "live_client_update", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            rounds.train_arrays(*work_order(config, 6, rounds.context.model))
    assert rounds.store.count_pending() == 5 and rounds.store.claimed_rounds() == []


def test_outcomes_a_device_missed_arrive_with_the_next_work_order(device):
    rounds, config, _ = device
    with single_thread():
        rounds.train_arrays(*work_order(config, 5, rounds.context.model))
        arrays, header = work_order(config, 6, rounds.context.model)
        rounds.train_arrays(arrays, header | {"settled": {"5": True}})
    assert sum(i.consumed_round == 5 for i in rounds.store.recent()) == 3


def test_a_work_order_for_another_model_or_algorithm_is_refused(device):
    rounds, config, _ = device
    arrays, header = work_order(config, 1, rounds.context.model)
    for change, words in ((("lora", "rank", 2), "another model or LoRA shape"), (("algorithm", None, "grpo"), "cannot learn")):
        bad = work_order_config(config)
        section, field, value = change
        if field is None:
            bad[section] = value
        else:
            bad[section][field] = value
        with pytest.raises(UserError, match=words):
            rounds.train_arrays(arrays, {"request": header["request"] | {"config": bad}})
    assert rounds.store.claimed_rounds() == []


def test_a_round_takes_at_most_its_prompts_oldest_first(device):
    rounds, config, ids = device
    config = config.model_copy(update={"client": config.client.model_copy(update={"prompts_per_round": 2})})
    with single_thread():
        _, result = rounds.train_arrays(*work_order(config, 5, rounds.context.model))
    assert result["weight"] == 2 and result["metrics"]["stale_skipped"] == 2
    assert rounds.settle(5, accepted=True) == 2
    consumed = {i.id: i.consumed_round for i in rounds.store.recent()}
    assert [consumed[i] for i in ids[3]] == [5, 5] and consumed[ids[4][0]] is None  # version 4's waits for the next


def update_norm(payload, model) -> float:
    start = get_adapter_state(model)
    return math.sqrt(sum(float(np.square(payload[name].astype(np.float64) - start[name].numpy()).sum()) for name in payload))


def test_a_work_order_cannot_turn_off_or_weaken_the_devices_local_dp(tokenizer, tmp_path):
    own = ("privacy.mode=local", "privacy.noise_multiplier=2", "privacy.clip_norm=0.5")
    with device_with(tokenizer, tmp_path, *own) as (rounds, _, _):
        size = sum(tensor.numel() for tensor in get_adapter_state(rounds.context.model).values())
        noise_norm = 2 * 0.5 * math.sqrt(size)  # z C sqrt(d); the clipped update adds at most C = 0.5
        server = make_config(*DEVICE)  # the server's run has no DP at all
        lowered = make_config(*DEVICE, "privacy.mode=local", "privacy.noise_multiplier=0.01")
        for round_index, config in ((5, server), (6, lowered)):
            arrays, header = work_order(config, round_index, rounds.context.model)
            payload, result = rounds.train_arrays(arrays, header)
            # the norm of d Gaussian values has relative spread 1 / sqrt(2 d), under 1% here
            assert update_norm(payload, rounds.context.model) == pytest.approx(noise_norm, rel=0.05 + 0.5 / noise_norm)
            assert result["weight"] == config.client.prompts_per_round and result["metrics"]["first_try_correct"] == 0
            assert "pending" not in result["metrics"]  # nothing about the store travels un-noised
            rounds.settle(round_index, accepted=True)


def test_a_re_sent_work_order_gets_the_same_reply_and_no_other(tokenizer, tmp_path):
    with device_with(tokenizer, tmp_path, "privacy.mode=local") as (rounds, config, _):
        arrays, header = work_order(config, 5, rounds.context.model, nonce="a1")
        first = rounds.train_arrays(arrays, header)
        again = rounds.train_arrays(arrays, header)
        assert again[1] == first[1] and all(np.array_equal(again[0][name], first[0][name]) for name in first[0])
        for round_index, nonce in ((5, "b2"), (4, "c3")):  # the same round under another nonce, an older round
            with pytest.raises(UserError, match="answered already"):
                rounds.train_arrays(*work_order(config, round_index, rounds.context.model, nonce=nonce))
        assert len(rounds.device.ledger.releases) == 1


def test_the_device_accounts_every_release_and_refuses_past_its_own_budget(tokenizer, tmp_path):
    ledger = tmp_path / "device.privacy.json"
    budget = local_epsilon([3.0, 3.0], 1e-5) * 1.001  # two releases at z = 3, not three
    own = ("privacy.mode=local", "privacy.noise_multiplier=3", f"privacy.epsilon_budget={budget}")
    server = make_config(*DEVICE, "privacy.mode=local", "privacy.epsilon_budget=1000")  # a work order cannot raise it
    with device_with(tokenizer, tmp_path, *own, ledger_path=ledger) as (rounds, _, _):
        for round_index in (5, 6):
            rounds.train_arrays(*work_order(server, round_index, rounds.context.model, nonce=f"n{round_index}"))
            rounds.settle(round_index, accepted=False)
        with pytest.raises(PrivacyBudgetSpent, match="privacy budget"):
            rounds.train_arrays(*work_order(server, 7, rounds.context.model, nonce="n7"))
        assert rounds.store.claimed_rounds() == []
    assert os.stat(ledger).st_mode & 0o777 == 0o600
    with device_with(tokenizer, tmp_path / "restarted", *own, ledger_path=ledger) as (restarted, _, _):
        view = restarted.privacy()
        assert view["releases"] == 2 and view["spent"] and view["epsilon"] == pytest.approx(local_epsilon([3.0, 3.0], 1e-5))
        with pytest.raises(UserError, match="answered already"):  # a release on the ledger is never made again
            restarted.train_arrays(*work_order(server, 6, restarted.context.model, nonce="x"))
        with pytest.raises(PrivacyBudgetSpent):
            restarted.train_arrays(*work_order(server, 8, restarted.context.model, nonce="n8"))


def test_a_server_sent_verifier_or_data_path_is_refused(device):
    rounds, config, _ = device
    arrays, header = work_order(config, 5, rounds.context.model)
    for section, value in (("feedback", {"provider": "python", "function": "os:system"}), ("data", {"dataset": "jsonl:/etc/passwd"})):
        order = header["request"] | {"config": header["request"]["config"] | {section: value}}
        with pytest.raises(UserError, match=f"the work order sets {section}"):
            rounds.train_arrays(arrays, {"request": order})
    assert rounds.store.claimed_rounds() == []


# ------------------------------------------------------------------------------------------- the personal adapter


def answering_state(rounds) -> dict:
    return rounds.engine.adapter_state()


def same_state(first, second) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_a_round_trains_the_personal_adapter_which_answers_stays_on_the_device_and_survives_a_restart(tokenizer, tmp_path):
    path = tmp_path / "device.personal.safetensors"
    # two steps: after one, Ditto's personal adapter equals the global update (its pull starts at zero)
    with device_with(tokenizer, tmp_path, "personal.method=ditto", "spear.local_steps=2", personal_path=path) as (rounds, config, _):
        global_state = get_adapter_state(rounds.context.model)
        assert rounds.personal_view()["answering"] == "global" and not path.exists()
        with single_thread():
            payload, result = rounds.train_arrays(*work_order(config, 5, rounds.context.model))
        personal = rounds.personal.state
        assert result["weight"] == 3 and personal is not None and not same_state(personal, global_state)
        assert same_state(answering_state(rounds), personal)  # people are answered by the personal adapter
        # what leaves is the global update: it is not the personal adapter
        assert any(not np.array_equal(payload[name], personal[name].numpy()) for name in payload)
        view = rounds.personal_view()
        assert view["answering"] == "personal" and view["personal"]["round"] == 5 and view["global_version"] == 4
        assert os.stat(path).st_mode & 0o777 == 0o600
        on_disk = path.read_bytes()
    with device_with(tokenizer, tmp_path / "restarted", "personal.method=ditto", personal_path=path) as (restarted, _, _):
        assert same_state(restarted.personal.state, personal) and same_state(answering_state(restarted), personal)
        assert restarted.personal_view()["personal"]["round"] == 5
        restarted.reset_personal()  # a person's reset from the page
        assert not path.exists() and restarted.personal_view()["answering"] == "global"
        assert same_state(answering_state(restarted), restarted.global_state)
    assert on_disk  # byte for byte what the round wrote, read back above


def test_a_new_global_adapter_does_not_replace_the_personal_one_that_answers(tokenizer, tmp_path):
    with device_with(tokenizer, tmp_path, "personal.method=ditto") as (rounds, config, _):
        with single_thread():
            rounds.train_arrays(*work_order(config, 5, rounds.context.model))
        personal = rounds.personal.state
        new_global = {name: tensor + 0.5 for name, tensor in rounds.global_state.items()}
        rounds.settle(5, accepted=True, state=new_global, version=5)
        assert same_state(answering_state(rounds), personal) and same_state(rounds.global_state, new_global)
        rounds.reset_personal()
        assert same_state(answering_state(rounds), new_global)


def test_the_notice_that_ends_a_federation_stage_trains_the_personal_adapter_after_federation(tokenizer, tmp_path):
    with device_with(tokenizer, tmp_path, "personal.method=finetune", "personal.after_steps=2", "personal.after_lr=0.05") as (rounds, config, _):
        with single_thread():
            rounds.train_arrays(*work_order(config, 5, rounds.context.model))
            assert rounds.personal.state is None  # finetune keeps none during federation
            new_global = {name: tensor.clone() for name, tensor in rounds.global_state.items()}
            rounds.settle(5, accepted=True, state=new_global, version=5)
            assert rounds.personal.state is None  # an ordinary notice trains nothing
            rounds.settle(6, accepted=None, state=new_global, version=6, ends_federation=True)
        view = rounds.personal_view()
        assert view["answering"] == "personal" and view["personal"]["after_federation"] and view["personal"]["round"] == 6
        assert not same_state(rounds.personal.state, new_global) and same_state(answering_state(rounds), rounds.personal.state)


def test_tap_never_trains_on_its_validation_split_and_measures_on_its_right_answers(tokenizer, tmp_path, monkeypatch):
    held = set()
    monkeypatch.setattr(spearfl.serve.rounds, "held_for_validation", lambda interaction_id, fraction: interaction_id in held)
    with device_with(tokenizer, tmp_path, "personal.method=tap", "live.max_staleness=10") as (rounds, config, ids):
        held.update(ids[0][:1] + ids[3][:1])
        assert len(rounds.validation_answers()) == 2  # both judged right
        with single_thread():
            _, result = rounds.train_arrays(*work_order(config, 5, rounds.context.model))
        assert result["weight"] == 3 and rounds.store.claimed_rounds() == [5]
        rounds.settle(5, accepted=True)
        consumed = {i.id for i in rounds.store.recent() if i.consumed_round == 5}
        assert consumed.isdisjoint(held) and len(consumed) == 3
        assert rounds.personal.state is not None and "replaced" in rounds.personal_view()["personal"]["notes"]


def test_a_work_order_cannot_set_the_devices_personalization(device):
    rounds, config, _ = device
    arrays, header = work_order(config, 5, rounds.context.model)
    order = header["request"] | {"config": header["request"]["config"] | {"personal": {"method": "local"}}}
    with pytest.raises(UserError, match="the work order sets personal"):
        rounds.train_arrays(arrays, {"request": order})
