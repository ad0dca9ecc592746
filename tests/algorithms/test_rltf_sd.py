"""RLTF-SD client update: groups of first attempts, revisions of the wrong ones, per-prompt baselines,
advantage-weighted distillation under the original prompt, skipping, one runtime round."""

import math

import pytest
import torch
from helpers import (
    answers,
    assert_float32_close,
    completion_logprobs,
    first_calls_beside_spear,
    float64_twin,
    make_config,
    make_context,
    multiple_choice,
    one_round,
    scripted,
    tiny_lora_model,
    work_order,
)

import spearfl.algorithms.rltf_sd as rltf_sd
from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientRound, Trainer, sample_examples
from spearfl.algorithms.rltf_sd import Weighted, rltf_sd_step
from spearfl.feedback.providers import VERDICT_WRONG
from spearfl.lm.models import get_adapter_state
from spearfl.runtime.setup import prepare_data

FRUIT = multiple_choice("t/fruit", "Which of these is a fruit?", ("apple", "rock", "car"), gold=0)
ANIMAL = multiple_choice("t/animal", "Which of these is an animal?", ("tree", "cat", "cup"), gold=1)


def capture_training(monkeypatch):
    captured = []
    monkeypatch.setattr(rltf_sd, "train", lambda context, work, weighted: captured.append(weighted) or {})
    return captured


def test_groups_revise_only_wrong_attempts_with_per_prompt_baselines(tokenizer, monkeypatch):
    """FRUIT: first attempts C, A, B (one right); the wrong ones revise to A (right) and C (wrong).
    ANIMAL: three right first attempts end their episodes: its group carries no signal, whatever FRUIT's does."""
    model = tiny_lora_model(tokenizer)
    script = {FRUIT: answers(tokenizer, "C", "A", "B", "A", "C"), ANIMAL: answers(tokenizer, "B", "B", "B")}
    generation = scripted(monkeypatch, tokenizer, script)
    captured = capture_training(monkeypatch)
    config = make_config("client.prompts_per_round=2", "rltf_sd.group_size=3")
    context = make_context(model, tokenizer, config)
    work = work_order([FRUIT, ANIMAL], get_adapter_state(model))
    result = rltf_sd.client_update(context, work)

    examples = sample_examples(work.examples, 2, work.seed("prompts"))
    prompts = [context.prompts.task(example) for example in examples]
    first_call, revision_call = generation.calls
    assert first_call.prompts == prompts * 3 and first_call.seed == work.seed("first-attempt")  # sample-major
    assert revision_call.is_revision == [True, True] and revision_call.seed == work.seed("revision-1")
    for revision_prompt, wrong_label in zip(revision_call.prompts, ("C", "B")):  # FRUIT's samples 0 and 2, in order
        text = tokenizer.decode(revision_prompt)
        assert FRUIT.question in text and f"Answer: {wrong_label}" in text and VERDICT_WRONG in text

    fruit_prompt = context.prompts.task(FRUIT)
    weighted = captured[0]
    assert all(item.prompt == fruit_prompt or item.term == "second_turn_pg" for item in weighted)  # nothing of ANIMAL
    def label(item):
        return tokenizer.decode(item.completion).strip().removeprefix("Answer:").strip()

    by_term = {term: [(label(item), item.advantage) for item in weighted if item.term == term] for term in rltf_sd.TERMS}
    mean_return = (0.1 + 1.0 + 0.0) / 3  # r0 + 0.1 r1 = [0.1, 1, 0]
    expected_first = [("C", 0.1 - mean_return), ("A", 1 - mean_return), ("B", -mean_return)]
    assert by_term["first_turn_pg"] == [(name, pytest.approx(value)) for name, value in expected_first]
    assert by_term["second_turn_pg"] == [("A", pytest.approx(0.5)), ("C", pytest.approx(-0.5))]  # r1 - mean r1
    # distilled under x0, weighed by r1 - mean r0 = r1 - 1/3: the wrong revision is pushed down
    assert by_term["distill"] == [("A", pytest.approx(2 / 3)), ("C", pytest.approx(-1 / 3))]
    assert all(item.prompt == fruit_prompt for item in weighted if item.term != "second_turn_pg")
    assert [item.prompt for item in weighted if item.term == "second_turn_pg"] == revision_call.prompts

    assert result.weight == 1
    metrics = result.metrics
    assert metrics["first_try_correct"] == 1  # sample 0 of each prompt: FRUIT's C (wrong), ANIMAL's B (right)
    assert metrics["revised_correct"] == 1 and metrics["revision_success"] == 1.0  # FRUIT's sample 0: C, then A
    assert metrics["generations"] == 8 and metrics["sample_accuracy"] == pytest.approx(4 / 6)
    assert metrics["second_turn_accuracy"] == pytest.approx(0.5)
    assert metrics["distilled"] == 2 and metrics["signal_prompts"] == 1 and metrics["skipped"] == 0


def test_loss_matches_a_hand_assembly(tokenizer):
    """Each term: - sum(advantage x log-prob) over its tokens / its tokens; distill_coef weighs the third."""
    model = tiny_lora_model(tokenizer)
    model.eval()

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    x0 = [tokenizer.encode(f"Task {index}:") for index in range(2)]
    x1 = tokenizer.encode("Task 0, feedback, revise:")
    weighted = [
        Weighted(x0[0], ids("Answer: C\n"), -0.5, "first_turn_pg"),
        Weighted(x0[1], ids("So, Answer: B\n"), 0.25, "first_turn_pg"),
        Weighted(x1, ids("Answer: A\n"), 0.5, "second_turn_pg"),
        Weighted(x0[0], ids("Answer: A\n"), 2 / 3, "distill"),
        Weighted(x0[1], ids("Answer: B, surely\n"), -1 / 3, "distill"),
    ]
    context = make_context(model, tokenizer, make_config("rltf_sd.distill_coef=0.7"))
    total, parts = rltf_sd_step(context, Trainer(context), weighted)

    def term(scorer, name):
        rows = [item for item in weighted if item.term == name]
        scores = completion_logprobs(scorer, [item.prompt for item in rows], [item.completion for item in rows])
        return -sum(item.advantage * float(row.sum()) for item, row in zip(rows, scores)) / sum(len(row) for row in scores)

    twin = float64_twin(model)
    expected = {name: term(model, name) for name in rltf_sd.TERMS}
    exact = {name: term(twin, name) for name in rltf_sd.TERMS}
    for name, value in expected.items():
        assert_float32_close(parts[name], value, exact[name], name)

    def combined(terms):
        return terms["first_turn_pg"] + terms["second_turn_pg"] + 0.7 * terms["distill"]

    assert_float32_close(total, combined(expected), combined(exact), "total")
    assert parts["trained_tokens"] == sum(len(item.prompt) + len(item.completion) for item in weighted)  # one forward


@pytest.mark.parametrize(
    "script",
    [
        {FRUIT: ["A", "A"], ANIMAL: ["B", "B"]},  # every first attempt right: no revision, no signal
        {FRUIT: ["B", "C", "B", "C"], ANIMAL: ["A", "C", "C", "A"]},  # every attempt and revision wrong
    ],
)
def test_no_signal_skips_training_and_weighs_nothing(tokenizer, monkeypatch, script):
    model = tiny_lora_model(tokenizer)
    scripted(monkeypatch, tokenizer, {example: answers(tokenizer, *labels) for example, labels in script.items()})
    monkeypatch.setattr(rltf_sd, "train", lambda *args: pytest.fail("trained without a signal"))
    global_state = {name: value + 0.01 for name, value in get_adapter_state(model).items()}
    config = make_config("client.prompts_per_round=2", "rltf_sd.group_size=2")
    result = rltf_sd.client_update(make_context(model, tokenizer, config), work_order([FRUIT, ANIMAL], global_state))
    assert result.weight == 0 and result.metrics["skipped"] == 1 and result.metrics["trained_tokens"] == 0
    assert result.state is global_state
    assert result.metrics["generations"] == sum(len(labels) for labels in script.values())


def test_no_wrong_first_attempt_gives_no_revision_success_rate(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    scripted(monkeypatch, tokenizer, {FRUIT: answers(tokenizer, "A", "B", "A"), ANIMAL: answers(tokenizer, "B", "B")})
    capture_training(monkeypatch)
    config = make_config("client.prompts_per_round=2", "rltf_sd.group_size=2")
    result = rltf_sd.client_update(make_context(model, tokenizer, config), work_order([FRUIT, ANIMAL], get_adapter_state(model)))
    # sample 0 of both prompts is right (FRUIT's A, ANIMAL's B): no first attempt to revise, no rate
    assert math.isnan(result.metrics["revision_success"]) and result.metrics["revised_correct"] == 0
    assert result.metrics["first_try_correct"] == 2 and result.metrics["generations"] == 5  # FRUIT's B was revised
    assert result.weight == 1  # FRUIT's group is mixed; ANIMAL's agrees


def test_rltf_sd_gets_the_prompts_and_first_attempts_spear_would(tokenizer, monkeypatch):
    spear_call, rltf_call = first_calls_beside_spear(monkeypatch, tokenizer, rltf_sd, ("B", "A", "A", "A"), "rltf_sd.group_size=2", "spear.num_revisions=1")
    assert rltf_call.prompts[:3] == spear_call.prompts and rltf_call.seed == spear_call.seed


def test_one_rltf_sd_round_through_the_local_runtime(tmp_path, monkeypatch):
    assert ALGORITHMS["rltf_sd"] is rltf_sd.client_update
    num_prompts, group_size = 4, 2
    config, calls, judged, row = one_round(
        tmp_path, monkeypatch, "rltf_sd", f"client.prompts_per_round={num_prompts}", f"rltf_sd.group_size={group_size}",
        "rltf_sd.distill_coef=1.0",
    )
    federation = prepare_data(config)
    assert len(row["clients"]) == 2
    seen = 0
    for client in row["clients"]:
        metrics = client["metrics"]
        work = ClientRound(client["client"], 1, federation.clients[client["client"]], {}, 0.0, config.seed)
        examples = sample_examples(work.examples, num_prompts, work.seed("prompts"))  # what SPEAR would draw
        first_verdicts = judged[seen : seen + num_prompts * group_size]
        assert [example for example, _ in first_verdicts] == examples * group_size
        num_wrong = sum(not verdict.correct for _, verdict in first_verdicts)
        revisions = judged[seen + num_prompts * group_size : seen + num_prompts * group_size + num_wrong]
        seen += num_prompts * group_size + num_wrong
        assert metrics["generations"] == num_prompts * group_size + num_wrong
        first_rewards = torch.tensor([float(v.correct) for _, v in first_verdicts]).view(group_size, num_prompts).T
        assert metrics["first_try_correct"] == int(first_rewards[:, 0].sum())
        assert len(revisions) == num_wrong
        if num_wrong:
            assert metrics["second_turn_accuracy"] == pytest.approx(sum(v.correct for _, v in revisions) / num_wrong)
        assert client["weight"] == metrics["signal_prompts"] <= num_prompts
        assert (metrics["trained_tokens"] > 0) == (client["weight"] > 0) and metrics["skipped"] == (client["weight"] == 0)
        if client["weight"] > 0:
            assert metrics["optimizer_steps"] == config.client.local_steps
    assert seen == len(judged)
    assert any(client["weight"] > 0 for client in row["clients"])
