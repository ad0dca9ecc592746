"""RLTF-SD client update: two turns, advantages, self-distillation under the original prompt, skipping, one runtime round."""

import math

import pytest
import torch
from helpers import (
    answers,
    completion_logprobs,
    make_config,
    make_context,
    multiple_choice,
    one_round,
    scripted,
    tiny_lora_model,
    work_order,
)

import spearfl.algorithms.rltf_sd as rltf_sd
import spearfl.algorithms.spear as spear
from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientRound, sample_examples
from spearfl.algorithms.rltf_sd import TwoTurns, rltf_sd_loss
from spearfl.feedback.providers import VERDICT_CORRECT, VERDICT_WRONG
from spearfl.lm.models import get_adapter_state
from spearfl.runtime.setup import prepare_data

FRUIT = multiple_choice("t/fruit", "Which of these is a fruit?", ("apple", "rock", "car"), gold=0)
ANIMAL = multiple_choice("t/animal", "Which of these is an animal?", ("tree", "cat", "cup"), gold=1)
COLOUR = multiple_choice("t/colour", "Which of these is a colour?", ("dog", "pen", "red"), gold=2)


def capture_training(monkeypatch):
    captured = []
    monkeypatch.setattr(rltf_sd, "train", lambda context, work, rollouts: captured.append(rollouts) or {})
    return captured


def test_two_turns_rewards_advantages_and_metrics(tokenizer, monkeypatch):
    """FRUIT wrong then fixed, ANIMAL right twice, COLOUR wrong twice."""
    model = tiny_lora_model(tokenizer)
    script = {FRUIT: answers(tokenizer, "C", "A"), ANIMAL: answers(tokenizer, "B", "B"), COLOUR: answers(tokenizer, "A", "B")}
    generation = scripted(monkeypatch, tokenizer, script)
    captured = capture_training(monkeypatch)
    config = make_config("rltf_sd.prompts_per_round=3")
    context = make_context(model, tokenizer, config)
    work = work_order([FRUIT, ANIMAL, COLOUR], get_adapter_state(model))
    result = rltf_sd.client_update(context, work)

    examples = sample_examples(work.examples, 3, work.seed("prompts"))
    prompts = [context.prompts.task(example) for example in examples]
    assert [len(call.prompts) for call in generation.calls] == [3, 3]  # every first attempt gets one revision
    assert generation.calls[0].prompts == prompts and generation.calls[0].is_revision == [False] * 3
    assert generation.calls[1].is_revision == [True] * 3
    assert [call.seed for call in generation.calls] == [work.seed("first-attempt"), work.seed("revision-1")]
    for example, revision_prompt in zip(examples, generation.calls[1].prompts):
        text = tokenizer.decode(revision_prompt)
        first_label = tokenizer.decode(script[example][0].token_ids).strip()
        assert example.question in text and first_label in text
        assert (VERDICT_CORRECT if example is ANIMAL else VERDICT_WRONG) in text

    rollouts = {tokenizer.decode(r.prompt): r for r in captured[0]}
    by_example = {example: rollouts[tokenizer.decode(context.prompts.task(example))] for example in examples}
    # r0 = [0, 1, 0] (FRUIT, ANIMAL, COLOUR), mean 1/3; r1 = [1, 1, 0], mean 2/3.
    expected = {FRUIT: (-1 / 3, 1 / 3, True), ANIMAL: (2 / 3, 1 / 3, True), COLOUR: (-1 / 3, -2 / 3, False)}
    for example, (first_advantage, revision_advantage, correct) in expected.items():
        rollout = by_example[example]
        assert rollout.first_advantage == pytest.approx(first_advantage)
        assert rollout.revision_advantage == pytest.approx(revision_advantage)
        assert rollout.revision_correct is correct
        assert rollout.first == script[example][0].token_ids and rollout.revision == script[example][1].token_ids
        assert rollout.revision_prompt == generation.calls[1].prompts[examples.index(example)]
    assert result.weight == 3
    metrics = result.metrics
    assert metrics["first_try_correct"] == 1 and metrics["revised_correct"] == 1
    assert metrics["revision_success"] == pytest.approx(0.5) and metrics["second_turn_accuracy"] == pytest.approx(2 / 3)
    assert metrics["generations"] == 6
    assert metrics["generated_tokens"] == sum(len(c.token_ids) for pair in script.values() for c in pair)
    assert metrics["distilled"] == 2 and metrics["signal_prompts"] == 3 and metrics["skipped"] == 0


def test_loss_matches_a_hand_assembly(tokenizer):
    """PG on y0 | x0 and y1 | x1 with their advantages, plus distill_coef x CE of the correct y1 under x0."""
    model = tiny_lora_model(tokenizer)
    model.eval()

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    x0 = [tokenizer.encode(f"Task {index}:") for index in range(2)]
    x1 = [tokenizer.encode(f"Task {index}, feedback, revise:") for index in range(2)]
    rollouts = [
        TwoTurns(x0[0], ids("Answer: C\n"), x1[0], ids("Answer: A\n"), -0.5, 0.5, True),
        TwoTurns(x0[1], ids("So, Answer: B\n"), x1[1], ids("Answer: B\n"), 0.5, -0.5, False),
    ]
    context = make_context(model, tokenizer, make_config("rltf_sd.distill_coef=0.7"))
    total, parts = rltf_sd_loss(context, rollouts)

    first = completion_logprobs(model, x0, [r.first for r in rollouts], batch_size=4)
    second = completion_logprobs(model, x1, [r.revision for r in rollouts], batch_size=4)
    distilled = completion_logprobs(model, [x0[0]], [rollouts[0].revision], batch_size=4)

    def policy_gradient(rows, advantages):
        return -sum(a * float(row.sum()) for row, a in zip(rows, advantages)) / sum(len(row) for row in rows)

    first_pg = policy_gradient(first, [-0.5, 0.5])
    second_pg = policy_gradient(second, [0.5, -0.5])
    distill_nll = -float(distilled[0].mean())
    assert parts["first_turn_pg"] == pytest.approx(first_pg, rel=1e-4)
    assert parts["second_turn_pg"] == pytest.approx(second_pg, rel=1e-4)
    assert parts["distill_nll"] == pytest.approx(distill_nll, rel=1e-4)
    assert total.item() == pytest.approx(first_pg + second_pg + 0.7 * distill_nll, rel=1e-4)
    # Five rows in one forward pass: two first turns, two second turns, one distilled revision.
    rows = list(zip(x0, [r.first for r in rollouts])) + list(zip(x1, [r.revision for r in rollouts]))
    rows.append((x0[0], rollouts[0].revision))
    assert parts["trained_tokens"] == sum(len(prompt) + len(completion) for prompt, completion in rows)


def test_rows_with_zero_advantage_are_not_trained(tokenizer, monkeypatch):
    """All first attempts right, all revisions right: both PG terms are 0, only the distillation rows remain."""
    model = tiny_lora_model(tokenizer)
    script = {FRUIT: answers(tokenizer, "A", "A"), ANIMAL: answers(tokenizer, "B", "B")}
    scripted(monkeypatch, tokenizer, script)
    collated = []
    original_collate = rltf_sd.collate

    def spy_collate(prompts, completions, pad_id, device):
        batch = original_collate(prompts, completions, pad_id, device)
        collated.append((prompts, completions, batch.num_tokens))
        return batch

    monkeypatch.setattr(rltf_sd, "collate", spy_collate)
    config = make_config("rltf_sd.prompts_per_round=2", "rltf_sd.local_steps=2")
    context = make_context(model, tokenizer, config)
    before = get_adapter_state(model)
    result = rltf_sd.client_update(context, work_order([FRUIT, ANIMAL], before, lr=1e-2))
    assert result.weight == 2 and result.metrics["distilled"] == 2
    task_prompts = {tuple(context.prompts.task(example)) for example in (FRUIT, ANIMAL)}
    for prompts, completions, _ in collated:
        assert {tuple(prompt) for prompt in prompts} == task_prompts  # only (x0, y1) rows
    assert result.metrics["trained_tokens"] == sum(tokens for _, _, tokens in collated)
    assert result.metrics["first_turn_pg"] == 0 and result.metrics["second_turn_pg"] == 0
    assert any(not torch.equal(result.state[name], before[name]) for name in before)


def test_no_signal_skips_training_and_weighs_nothing(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    scripted(monkeypatch, tokenizer, {FRUIT: answers(tokenizer, "B", "C"), ANIMAL: answers(tokenizer, "A", "C")})
    monkeypatch.setattr(rltf_sd, "train", lambda *args: pytest.fail("trained without a signal"))
    global_state = {name: value + 0.01 for name, value in get_adapter_state(model).items()}
    config = make_config("rltf_sd.prompts_per_round=2")
    result = rltf_sd.client_update(make_context(model, tokenizer, config), work_order([FRUIT, ANIMAL], global_state))
    assert result.weight == 0 and result.metrics["skipped"] == 1 and result.metrics["trained_tokens"] == 0
    assert result.state is global_state
    assert result.metrics["generations"] == 4 and result.metrics["revision_success"] == 0


def test_no_wrong_first_attempt_gives_no_revision_success_rate(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    scripted(monkeypatch, tokenizer, {FRUIT: answers(tokenizer, "A", "B"), ANIMAL: answers(tokenizer, "B", "B")})
    capture_training(monkeypatch)
    config = make_config("rltf_sd.prompts_per_round=2")
    result = rltf_sd.client_update(make_context(model, tokenizer, config), work_order([FRUIT, ANIMAL], get_adapter_state(model)))
    assert math.isnan(result.metrics["revision_success"]) and result.metrics["revised_correct"] == 0
    assert result.metrics["first_try_correct"] == 2 and result.weight == 2  # r1 differs between the two prompts


def test_rltf_sd_gets_the_prompts_and_first_attempts_spear_would(tokenizer, monkeypatch):
    pool = [multiple_choice(f"t/{index}", f"Question number {index}?", ("yes", "no"), gold=0) for index in range(7)]
    script = {example: answers(tokenizer, "B", "A") for example in pool}
    model = tiny_lora_model(tokenizer)
    config = make_config("rltf_sd.prompts_per_round=3", "spear.prompts_per_round=3", "spear.num_revisions=1")
    context = make_context(model, tokenizer, config)
    work = work_order(pool, get_adapter_state(model), round_index=4, client_id=2)
    calls = []
    for update, module in ((spear.client_update, spear), (rltf_sd.client_update, rltf_sd)):
        generation = scripted(monkeypatch, tokenizer, script)
        monkeypatch.setattr(module, "train", lambda *args: {})
        update(context, work)
        calls.append(generation.calls)
    spear_calls, rltf_calls = calls
    assert [(c.prompts, c.seed) for c in rltf_calls] == [(c.prompts, c.seed) for c in spear_calls]  # every y0 was wrong


def test_one_rltf_sd_round_through_the_local_runtime(tmp_path, monkeypatch):
    assert ALGORITHMS["rltf_sd"] is rltf_sd.client_update
    num_prompts = 6
    config, calls, judged, row = one_round(
        tmp_path, monkeypatch, "rltf_sd", f"rltf_sd.prompts_per_round={num_prompts}", "rltf_sd.local_steps=2",
        "rltf_sd.batch_size=4",
    )
    federation = prepare_data(config)
    assert len(row["clients"]) == 2 and len(calls) == 4  # first attempts and revisions per client
    for index, client in enumerate(row["clients"]):
        metrics = client["metrics"]
        work = ClientRound(client["client"], 1, federation.clients[client["client"]], {}, 0.0, config.seed)
        examples = sample_examples(work.examples, num_prompts, work.seed("prompts"))  # what SPEAR would draw
        (_, first_seed, first), (_, revision_seed, revised) = calls[2 * index : 2 * index + 2]
        assert (first_seed, revision_seed) == (work.seed("first-attempt"), work.seed("revision-1"))
        verdicts = judged[2 * index * num_prompts : 2 * (index + 1) * num_prompts]
        assert [example for example, _ in verdicts] == examples * 2
        assert metrics["generations"] == 2 * num_prompts
        assert metrics["generated_tokens"] == sum(len(c.token_ids) for c in first + revised)
        first_rewards = torch.tensor([float(f.correct) for _, f in verdicts[:num_prompts]])
        revision_rewards = torch.tensor([float(f.correct) for _, f in verdicts[num_prompts:]])
        first_advantages = first_rewards - first_rewards.mean()
        revision_advantages = revision_rewards - revision_rewards.mean()
        signal = (first_advantages != 0) | (revision_advantages != 0) | (revision_rewards > 0)
        assert client["weight"] == int(signal.sum()) == metrics["signal_prompts"]
        assert metrics["first_try_correct"] == int(first_rewards.sum())
        assert metrics["revised_correct"] == int(((first_rewards == 0) & (revision_rewards == 1)).sum())
        assert (metrics["trained_tokens"] > 0) == (client["weight"] > 0) and metrics["skipped"] == (client["weight"] == 0)
    assert any(client["weight"] > 0 for client in row["clients"])
    assert row["online"]["generations"] == 4 * num_prompts
