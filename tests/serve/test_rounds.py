"""A device's rounds on its store: stale answers skipped and counted, claims consumed only on acceptance, a failed
round releasing what it claimed, and work orders for another model refused."""

import pytest
from helpers import (
    encode_task,
    make_config,
    make_context,
    multiple_choice,
    single_thread,
    tiny_lora_model,
)

import spearfl.serve.rounds
from spearfl.config import config_to_dict
from spearfl.data.store import Attempt, InteractionStore
from spearfl.errors import UserError
from spearfl.lm.generation import SamplingSettings
from spearfl.lm.models import get_adapter_state
from spearfl.serve.engine import AnswerEngine
from spearfl.serve.rounds import DeviceRounds

FRUIT = multiple_choice("t/fruit", "Which of these is a fruit?", ("apple", "rock", "car"), gold=0)


@pytest.fixture
def device(tokenizer, tmp_path):
    with single_thread():
        model = tiny_lora_model(tokenizer)
        config = make_config("live.min_interactions=2", "live.max_staleness=1", "spear.local_steps=1")
        context = make_context(model, tokenizer, config)
        engine = AnswerEngine(model, tokenizer, SamplingSettings(4, 1.0, 1.0, 4))
        store = InteractionStore(tmp_path / "device.sqlite")
        prompt, answer = encode_task(tokenizer, FRUIT), tokenizer.encode("Answer: apple\n", add_special_tokens=False)
        ids = {}
        for version in (0, 0, 3, 3, 4):  # answered by these adapter versions, every one judged right
            interaction = store.add(FRUIT.question, Attempt(prompt, "Answer: apple", answer, version, "stop"), list(FRUIT.options))
            store.judge(interaction, 0, True)
            ids.setdefault(version, []).append(interaction)
        yield DeviceRounds(context, store, engine), config, ids
        engine.close()
        store.close()


def work_order(config, round_index, model):
    arrays = {name: tensor.numpy() for name, tensor in get_adapter_state(model).items()}
    return arrays, {"request": {"config": config_to_dict(config), "client_id": 0, "round_index": round_index, "lr": 0.01}}


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
        bad = config_to_dict(config)
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
