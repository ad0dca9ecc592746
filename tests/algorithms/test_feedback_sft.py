"""feedback-SFT: SPEAR's round with the unlikelihood weight at 0, and one round through the local runtime."""

import pytest
import torch
from helpers import (
    ScriptedGeneration,
    completion_from_text,
    end_to_end_assets,
    make_config,
    make_context,
    multiple_choice,
    read_history,
    single_thread,
    tiny_lora_model,
    write_run_config,
)

import spearfl.algorithms.base
import spearfl.algorithms.feedback_sft as feedback_sft
import spearfl.algorithms.spear as spear
from spearfl.algorithms.base import ClientRound
from spearfl.config import load_config
from spearfl.io import load_tensors
from spearfl.lm.models import get_adapter_state, load_base_model
from spearfl.lm.training import collate
from spearfl.runtime.local import run_local
from spearfl.runtime.run_folder import RunFolder
from spearfl.runtime.setup import build_context

FRUIT = multiple_choice("t/fruit", "Which of these is a fruit?", ("apple", "rock", "car"), gold=0)
ANIMAL = multiple_choice("t/animal", "Which of these is an animal?", ("tree", "cat", "cup"), gold=1)
COLOUR = multiple_choice("t/colour", "Which of these is a colour?", ("dog", "pen", "red"), gold=2)
OVERRIDES = (
    "spear.prompts_per_round=3", "spear.num_revisions=1", "spear.local_steps=3", "spear.margin=0.0", "spear.lose_cap_ratio=4"
)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def script_for(tokenizer):
    """FRUIT right at once; ANIMAL wrong, then fixed; COLOUR wrong twice: 2 wins, 2 losses."""
    def answers(*texts):
        return [completion_from_text(tokenizer, text) for text in texts]

    return {
        FRUIT.question: answers("Answer: A\n"),
        ANIMAL.question: answers("Answer: C\n", "Answer: B\n"),
        COLOUR.question: answers("Answer: A\n", "Answer: B\n"),
    }


def run_round(update, tokenizer, monkeypatch, *overrides):
    """One scripted round of `update` on a fresh tiny model.

    Returns the result, the config, the trained (prompt, completion) pairs and the seed of each generation call.
    """
    model = tiny_lora_model(tokenizer)
    generation = ScriptedGeneration(tokenizer, script_for(tokenizer))
    monkeypatch.setattr(spearfl.algorithms.base, "generate", generation)
    trained = []

    def spy_collate(prompts, completions, pad_id, device):
        trained.extend((tuple(prompt), tuple(completion)) for prompt, completion in zip(prompts, completions))
        return collate(prompts, completions, pad_id, device)

    monkeypatch.setattr(spear, "collate", spy_collate)
    config = make_config(*OVERRIDES, *overrides)
    global_state = {name: value + 0.01 for name, value in get_adapter_state(model).items()}
    work = ClientRound(0, 1, [FRUIT, ANIMAL, COLOUR], global_state, 1e-2, run_seed=3)
    result = update(make_context(model, tokenizer, config), work)
    return result, config, trained, [call.seed for call in generation.calls]


def test_same_wins_as_spear_and_no_loss_is_trained(tokenizer, monkeypatch):
    spear_result, _, _, spear_seeds = run_round(spear.client_update, tokenizer, monkeypatch)
    result, config, trained, seeds = run_round(feedback_sft.client_update, tokenizer, monkeypatch)
    assert seeds == spear_seeds and len(seeds) == 2  # first attempts, then one revision
    same = ("prompts", "wins", "losses", "first_try_correct", "revised_correct", "generations", "generated_tokens")
    assert {key: result.metrics[key] for key in same} == {key: spear_result.metrics[key] for key in same}
    assert result.weight == 2 and spear_result.weight == 3 and result.metrics["skipped"] == 0  # wins; wins + a loss
    assert spear_result.metrics["lose_unlikelihood"] > 0
    assert result.metrics["lose_unlikelihood"] == 0
    context = make_context(None, tokenizer, config)
    wins = {
        (tuple(context.prompts.task(FRUIT)), tuple(completion_from_text(tokenizer, "Answer: A\n").token_ids)),
        (tuple(context.prompts.task(ANIMAL)), tuple(completion_from_text(tokenizer, "Answer: B\n").token_ids)),
    }
    assert set(trained) == wins
    assert len(trained) == 3 * 2  # every step trains the two wins and nothing else
    assert spear_result.metrics["trained_tokens"] > result.metrics["trained_tokens"] > 0
    assert config.spear.lambda_lose == 0.1  # the caller's config is left as it was


def test_it_is_exactly_spear_with_lambda_lose_zero(tokenizer, monkeypatch):
    result, _, _, _ = run_round(feedback_sft.client_update, tokenizer, monkeypatch)
    reference, _, _, _ = run_round(spear.client_update, tokenizer, monkeypatch, "spear.lambda_lose=0.0")
    assert all(torch.equal(result.state[name], reference.state[name]) for name in reference.state)
    assert result.weight == reference.weight
    assert result.metrics["loss"] == reference.metrics["loss"]


def test_one_round_through_the_local_runtime_trains_only_lora_and_counts_costs(tmp_path):
    assets = end_to_end_assets()
    config = load_config(
        write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run"), ["algorithm=feedback_sft", "server.rounds=1"]
    )
    model, tokenizer = load_base_model(config.model.model_copy(update={"device": "cpu"}))
    context = build_context(config, model, tokenizer)
    base_before = {name: p.detach().clone() for name, p in context.model.named_parameters() if "lora_" not in name}
    run_local(config, show_progress=False, context=context)

    assert all(torch.equal(p, base_before[name]) for name, p in context.model.named_parameters() if "lora_" not in name)
    folder = RunFolder(config.output_dir)
    start, end = load_tensors(folder.adapter_path(0)), load_tensors(folder.adapter_path(1))
    assert any(not torch.equal(start[name], end[name]) for name in start)
    clients = read_history(tmp_path / "run")[1]["clients"]
    assert len(clients) == 2 and any(client["weight"] > 0 for client in clients)
    for client in clients:
        metrics = client["metrics"]
        assert client["weight"] == metrics["wins"]
        assert metrics["generations"] >= metrics["prompts"] == 6 and metrics["generated_tokens"] > 0
        assert metrics.get("lose_unlikelihood", 0) == 0  # absent when the client had no win and skipped
        assert (metrics["trained_tokens"] > 0) == (metrics["skipped"] == 0) == (metrics["upload_bytes"] > 0)
