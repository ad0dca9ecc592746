"""GRPO client update: groups, advantages, old log-probs, clipping, skipping, and one round through the local runtime."""

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

import spearfl.algorithms.grpo as grpo
from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientRound, sample_examples
from spearfl.feedback.providers import Feedback
from spearfl.lm.models import get_adapter_state, set_adapter_state
from spearfl.runtime.setup import prepare_data

FRUIT = multiple_choice("t/fruit", "Which of these is a fruit?", ("apple", "rock", "car"), gold=0)
ANIMAL = multiple_choice("t/animal", "Which of these is an animal?", ("tree", "cat", "cup"), gold=1)
COLOUR = multiple_choice("t/colour", "Which of these is a colour?", ("dog", "pen", "red"), gold=2)


def mixed_fruit_script(tokenizer):
    """G = 3: FRUIT has mixed rewards [1, 0, 1]; ANIMAL is always wrong and COLOUR always right (no signal)."""
    return {
        FRUIT: answers(tokenizer, "A", "C", "A"),
        ANIMAL: answers(tokenizer, "C", "C", "A"),
        COLOUR: answers(tokenizer, "C", "C", "C"),
    }


def capture_training(monkeypatch):
    captured = []
    monkeypatch.setattr(grpo, "train", lambda context, work, rollouts: captured.append(rollouts) or {})
    return captured


def test_groups_sample_major_advantages_and_weight(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    script = mixed_fruit_script(tokenizer)
    generation = scripted(monkeypatch, tokenizer, script)
    captured = capture_training(monkeypatch)
    config = make_config("grpo.prompts_per_round=3", "grpo.group_size=3")
    context = make_context(model, tokenizer, config)
    work = work_order([FRUIT, ANIMAL, COLOUR], get_adapter_state(model))
    result = grpo.client_update(context, work)

    examples = sample_examples(work.examples, 3, work.seed("prompts"))
    prompts = [context.prompts.task(example) for example in examples]
    assert len(generation.calls) == 1  # one generate call for all n x G samples
    assert generation.calls[0].prompts == prompts * 3  # sample-major: [all prompts] x G
    assert generation.calls[0].seed == work.seed("first-attempt")
    assert result.weight == 1  # only FRUIT's group has mixed rewards
    rollouts = captured[0]
    assert [r.prompt for r in rollouts] == [context.prompts.task(FRUIT)] * 3
    assert [r.completion for r in rollouts] == [c.token_ids for c in script[FRUIT]]
    # rewards [1, 0, 1]: mean 2/3, population std sqrt(2)/3
    assert [r.advantage for r in rollouts] == pytest.approx([2**-0.5, -(2**0.5), 2**-0.5], rel=1e-3)
    metrics = result.metrics
    assert metrics["generations"] == 9
    assert metrics["generated_tokens"] == sum(len(c.token_ids) for group in script.values() for c in group)
    assert metrics["first_try_correct"] == 2  # sample 0 of each group: FRUIT "A" right, ANIMAL "C" wrong, COLOUR "C" right
    assert metrics["first_try_accuracy"] == pytest.approx(2 / 3)
    assert metrics["sample_accuracy"] == pytest.approx(5 / 9)
    assert metrics["informative_groups"] == 1 and metrics["skipped"] == 0
    assert not {"revised_correct", "wins", "losses"} & metrics.keys()  # SPEAR's counters: GRPO has none


def test_old_logprobs_are_the_samplers_under_the_round_start_adapter(tokenizer, monkeypatch):
    """Real sampling: the log-probs GRPO keeps equal a fresh scoring of the samples by the round-start adapter,
    at the temperature they were sampled with."""
    model = tiny_lora_model(tokenizer)
    global_state = {name: value + 0.05 for name, value in get_adapter_state(model).items()}
    captured = capture_training(monkeypatch)
    config = make_config("grpo.prompts_per_round=3", "grpo.group_size=4", "generation.max_new_tokens=6", "generation.temperature=1.5")
    alternating = iter(range(100))
    context = make_context(model, tokenizer, config, feedback=lambda example, text: Feedback(next(alternating) % 2 == 0, None, "none"))
    grpo.client_update(context, work_order([FRUIT, ANIMAL, COLOUR], global_state))
    rollouts = captured[0]
    assert len(rollouts) == 12  # every group has right and wrong samples
    set_adapter_state(model, global_state)
    prompts, completions = [r.prompt for r in rollouts], [r.completion for r in rollouts]
    expected = completion_logprobs(model, prompts, completions, batch_size=1, temperature=1.5)
    exact = completion_logprobs(float64_twin(model), prompts, completions, batch_size=1, temperature=1.5)
    for rollout, row, reference in zip(rollouts, expected, exact):
        assert_float32_close(rollout.old_logprobs, row, reference)


def test_groups_that_all_agree_skip_training(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    scripted(monkeypatch, tokenizer, {FRUIT: answers(tokenizer, "A", "A"), ANIMAL: answers(tokenizer, "A", "C")})
    monkeypatch.setattr(grpo, "train", lambda *args: pytest.fail("trained without a mixed group"))
    global_state = {name: value + 0.01 for name, value in get_adapter_state(model).items()}
    config = make_config("grpo.prompts_per_round=2", "grpo.group_size=2")
    result = grpo.client_update(make_context(model, tokenizer, config), work_order([FRUIT, ANIMAL], global_state))
    assert result.weight == 0 and result.metrics["skipped"] == 1 and result.metrics["trained_tokens"] == 0
    assert result.state is global_state
    assert result.metrics["generations"] == 4 and result.metrics["first_try_correct"] == 1


def spy_on_steps(monkeypatch) -> list:
    """Record each GRPO step's rollouts and loss parts."""
    steps = []
    original_step = grpo.grpo_step

    def spy_step(context, trainer, rollouts):
        loss, parts = original_step(context, trainer, rollouts)
        steps.append((rollouts, parts))
        return loss, parts

    monkeypatch.setattr(grpo, "grpo_step", spy_step)
    return steps


def test_every_pass_trains_on_every_rollout_and_the_clip_acts(tokenizer, monkeypatch):
    """5 steps in 2 passes over the 6 rollouts of two mixed groups: each pass covers all of them once; the first
    step has ratio 1 (no dropout), later ones see the moved policy and clip."""
    model = tiny_lora_model(tokenizer, dropout=0.0)
    scripted(monkeypatch, tokenizer, mixed_fruit_script(tokenizer) | {ANIMAL: answers(tokenizer, "B", "C", "C")})
    steps = spy_on_steps(monkeypatch)
    config = make_config(
        "client.prompts_per_round=3", "client.local_steps=5", "grpo.group_size=3", "grpo.passes=2",
        "grpo.clip_epsilon=0.1", "optimizer.max_grad_norm=null",
    )
    work = work_order([FRUIT, ANIMAL, COLOUR], get_adapter_state(model), lr=0.05)
    result = grpo.client_update(make_context(model, tokenizer, config), work)
    assert result.weight == 2 and result.metrics["optimizer_steps"] == 5
    batches = [[id(rollout) for rollout in rollouts] for rollouts, _ in steps]
    assert [len(batch) for batch in batches] == [2, 2, 2, 3, 3]  # 3 steps, then 2, as even as the rollouts go
    first_pass, second_pass = sum(batches[:3], []), sum(batches[3:], [])
    assert len(set(first_pass)) == len(first_pass) == 6 and sorted(first_pass) == sorted(second_pass)
    first, later = steps[0][1], [parts for _, parts in steps[1:]]
    assert first["clipped_fraction"] == 0 and first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert any(parts["clipped_fraction"] > 0 for parts in later) and all(parts["kl"] > 0 for parts in later)
    assert result.metrics["trained_tokens"] == sum(parts["trained_tokens"] for _, parts in steps)


def test_the_ratio_is_against_the_policy_that_sampled_at_its_temperature(tokenizer, monkeypatch):
    """At the first step the policy is the sampler: with the sampler's tempered log-probs and the loss's logits
    divided by the same temperature, every ratio is 1, so the surrogate is minus the token-mean advantage."""
    model = tiny_lora_model(tokenizer, dropout=0.0)
    scripted(monkeypatch, tokenizer, mixed_fruit_script(tokenizer))
    steps = spy_on_steps(monkeypatch)
    config = make_config("client.prompts_per_round=3", "client.local_steps=1", "grpo.group_size=3", "grpo.passes=1",
                         "generation.temperature=0.5", "grpo.kl_coef=0.0")
    grpo.client_update(make_context(model, tokenizer, config), work_order([FRUIT, ANIMAL, COLOUR], get_adapter_state(model)))
    [(rollouts, parts)] = steps
    lengths = torch.tensor([len(rollout.completion) for rollout in rollouts], dtype=torch.float32)
    advantages = torch.tensor([rollout.advantage for rollout in rollouts])
    assert parts["surrogate"] == pytest.approx(float(-(advantages * lengths).sum() / lengths.sum()), abs=1e-5)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6)


def test_grpo_gets_the_prompts_and_first_attempts_spear_would(tokenizer, monkeypatch):
    spear_call, grpo_call = first_calls_beside_spear(monkeypatch, tokenizer, grpo, ("A", "B", "A"), "grpo.group_size=3", "spear.num_revisions=0")
    assert grpo_call.prompts[:3] == spear_call.prompts and grpo_call.seed == spear_call.seed


# ---------------------------------------------------------------------------------------------- local runtime


def test_one_grpo_round_through_the_local_runtime(tmp_path, monkeypatch):
    assert ALGORITHMS["grpo"] is grpo.client_update
    num_prompts, group_size = 4, 3
    config, calls, judged, row = one_round(
        tmp_path, monkeypatch, "grpo", f"client.prompts_per_round={num_prompts}", f"grpo.group_size={group_size}",
        "client.local_steps=2",
    )
    federation = prepare_data(config)
    assert len(row["clients"]) == 2 and len(calls) == 2
    for index, (client, (prompts, seed, completions)) in enumerate(zip(row["clients"], calls)):
        metrics = client["metrics"]
        work = ClientRound(client["client"], 1, federation.clients[client["client"]], {}, 0.0, config.seed)
        examples = sample_examples(work.examples, num_prompts, work.seed("prompts"))  # what SPEAR would draw
        verdicts = judged[index * num_prompts * group_size : (index + 1) * num_prompts * group_size]
        assert [example for example, _ in verdicts] == examples * group_size
        assert seed == work.seed("first-attempt") and len(prompts) == num_prompts * group_size
        assert metrics["generations"] == num_prompts * group_size
        assert metrics["generated_tokens"] == sum(len(c.token_ids) for c in completions)
        rewards = torch.tensor([float(f.correct) for _, f in verdicts]).view(group_size, num_prompts).T  # [P, G]
        mixed = int((rewards.std(dim=-1) > 0).sum())
        assert client["weight"] == mixed == metrics["informative_groups"]
        assert metrics["first_try_correct"] == int(rewards[:, 0].sum())
        assert metrics["skipped"] == (mixed == 0)
        assert (metrics["trained_tokens"] > 0) == (mixed > 0)
        assert metrics["seconds"] >= metrics["training_seconds"] >= 0 and metrics["peak_memory_mb"] > 0
    assert any(client["weight"] > 0 for client in row["clients"])
    assert row["online"]["generations"] == 2 * num_prompts * group_size
    assert row["online"]["trained_tokens"] == sum(client["metrics"]["trained_tokens"] for client in row["clients"])
