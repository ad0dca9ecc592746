"""Every method's optimizer step gives the same gradient however the memory plan runs it: one batch, or one row at a
time with checkpointed layers and the vocabulary in chunks (`spearfl.lm.memory`)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_config, make_context, tiny_lora_model

import spearfl.algorithms.base as base
from spearfl.algorithms import grpo, opsd, rltf_sd, spear
from spearfl.algorithms.base import ClientRound, Trainer
from spearfl.algorithms.spear import Trace, protected_token_flags
from spearfl.lm.memory import StepPlan
from spearfl.lm.models import get_adapter_state, lora_parameters, set_adapter_state

ONE_BATCH = StepPlan(micro_batch_rows=10**6, checkpoint=False, vocabulary_chunk=0, estimated_mb=0.0, fits=True)
ROW_BY_ROW = StepPlan(micro_batch_rows=1, checkpoint=True, vocabulary_chunk=3, estimated_mb=0.0, fits=True)
PAIRS = StepPlan(micro_batch_rows=2, checkpoint=False, vocabulary_chunk=5, estimated_mb=0.0, fits=True)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in ("Task 0: fruit?", "Task 1, a longer one: which animal barks?", "T2:")]


def spear_step(tokenizer, context, trainer):
    p = prompts(tokenizer)
    wins = [Trace(p[0], ids(tokenizer, "Answer: A\n")), Trace(p[1], ids(tokenizer, "So, Answer: B because\n")), Trace(p[2], ids(tokenizer, "B"))]
    wrong = [ids(tokenizer, "Answer: C\n"), ids(tokenizer, "Note: it is A. Answer: A"), ids(tokenizer, "Answer: D, surely")]
    losses = [Trace(prompt, completion, confidence, protected_token_flags(tokenizer, completion, ["Answer:"]))
              for prompt, completion, confidence in zip(p, wrong, (1.0, 0.5, 0.7))]
    reference = {name: value.detach() + 0.01 for name, value in lora_parameters(context.model).items()}
    return spear.spear_step(context, trainer, wins, losses, reference)


def grpo_step(tokenizer, context, trainer):
    p = prompts(tokenizer)
    completions = [ids(tokenizer, text) for text in ("Answer: A\n", "Answer: B, I think\n", "C", "Answer: D\n")]
    generator = torch.Generator().manual_seed(0)
    rollouts = [
        grpo.Rollout(p[index % 3], completion, advantage, -torch.rand(len(completion), generator=generator))
        for index, (completion, advantage) in enumerate(zip(completions, (1.0, -1.0, 0.5, -0.5)))
    ]
    return grpo.grpo_step(context, trainer, rollouts)


def rltf_sd_step(tokenizer, context, trainer):
    p = prompts(tokenizer)
    weighted = [
        rltf_sd.Weighted(p[0], ids(tokenizer, "Answer: C\n"), -0.5, "first_turn_pg"),
        rltf_sd.Weighted(p[1], ids(tokenizer, "So, Answer: B\n"), 0.25, "first_turn_pg"),
        rltf_sd.Weighted(p[2], ids(tokenizer, "Answer: A\n"), 0.5, "second_turn_pg"),
        rltf_sd.Weighted(p[0], ids(tokenizer, "Answer: A\n"), 2 / 3, "distill"),
        rltf_sd.Weighted(p[1], ids(tokenizer, "Answer: B, surely\n"), -1 / 3, "distill"),
    ]
    return rltf_sd.rltf_sd_step(context, trainer, weighted)


def opsd_step(tokenizer, context, trainer):
    p = prompts(tokenizer)
    completions = [ids(tokenizer, text) for text in ("Answer: A\n", "Answer: B, I think\n", "C")]
    generator = torch.Generator().manual_seed(1)
    vocabulary = context.model.config.vocab_size
    samples = [
        opsd.Sample(prompt, completion, torch.log_softmax(torch.randn(len(completion), vocabulary, generator=generator), -1).half())
        for prompt, completion in zip(p, completions)
    ]
    return opsd.opsd_step(context, trainer, samples)


def gradients_under(plan, step, tokenizer, monkeypatch, overrides=()):
    model = tiny_lora_model(tokenizer, seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(2))  # B = 0 would hide A's gradients
    context = make_context(model, tokenizer, make_config("spear.margin=0.0", "spear.lambda_anchor=0.1", *overrides))
    monkeypatch.setattr(base, "plan_step", lambda *args, **kwargs: plan)
    trainer = Trainer(context)
    model.train()
    loss, parts = step(tokenizer, context, trainer)
    assert trainer.plans == [plan]
    return loss, parts, {name: p.grad.clone() for name, p in lora_parameters(model).items()}


@pytest.mark.parametrize("step", [spear_step, grpo_step, rltf_sd_step, opsd_step], ids=lambda step: step.__name__)
@pytest.mark.parametrize("plan", [ROW_BY_ROW, PAIRS], ids=["row by row, checkpointed, vocabulary in chunks", "pairs"])
def test_micro_batches_give_the_one_batch_gradient(tokenizer, monkeypatch, step, plan):
    loss, parts, expected = gradients_under(ONE_BATCH, step, tokenizer, monkeypatch)
    micro_loss, micro_parts, got = gradients_under(plan, step, tokenizer, monkeypatch)
    assert micro_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert micro_parts.keys() == parts.keys()
    for key in parts:
        if key == "trained_tokens":  # a micro-batch runs only its own rows' columns
            assert micro_parts[key] == parts[key]
        else:
            assert micro_parts[key] == pytest.approx(parts[key], rel=1e-5, abs=1e-7), key
    assert_same_gradients(got, expected)


def assert_same_gradients(got, expected):
    """Equal within float32 rounding of sums taken in another order: relative to the largest gradient entry."""
    assert got.keys() == expected.keys()
    scale = max(float(gradient.abs().max()) for gradient in expected.values())
    assert scale > 0
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6 * scale), name


def test_the_grpo_temperature_reaches_the_chunked_log_probs(tokenizer, monkeypatch):
    overrides = ("generation.temperature=0.5",)
    loss, _, expected = gradients_under(ONE_BATCH, grpo_step, tokenizer, monkeypatch, overrides)
    micro_loss, _, got = gradients_under(ROW_BY_ROW, grpo_step, tokenizer, monkeypatch, overrides)
    _, _, at_one = gradients_under(ONE_BATCH, grpo_step, tokenizer, monkeypatch)
    assert micro_loss == pytest.approx(loss, rel=1e-5)
    assert_same_gradients(got, expected)
    assert not all(torch.allclose(at_one[name], expected[name]) for name in expected)  # the temperature mattered


def test_a_whole_round_reports_its_plan_and_a_tight_budget_micro_batches(tokenizer):
    """A SPEAR round with room to spare trains in one batch; with a budget below what the process already holds it
    takes the smallest plan (one row, checkpointed) and says the plan does not fit."""
    model = tiny_lora_model(tokenizer)
    p = prompts(tokenizer)
    traces = spear.Traces(
        [Trace(p[0], ids(tokenizer, "Answer: A\n"), prompt_index=0), Trace(p[1], ids(tokenizer, "Answer: B\n"), prompt_index=1)],
        [Trace(p[2], ids(tokenizer, "Answer: C\n"), 0.5, [False] * 4, 2)],
    )
    work = ClientRound(0, 1, [], get_adapter_state(model), 1e-3, 0)
    roomy = spear.train(make_context(model, tokenizer, make_config("client.local_steps=2")), work, traces)
    roomy_state = get_adapter_state(model)
    set_adapter_state(model, work.global_state)
    assert roomy["micro_batch_rows"] == 3 and roomy["checkpointed_steps"] == 0 and roomy["plan_fits"] == 1
    assert roomy["vocabulary_chunk"] > 0 and 0 < roomy["planned_working_mb"] <= roomy["working_memory_mb"]
    tight = spear.train(make_context(model, tokenizer, make_config("client.local_steps=2", "client.memory_budget_mb=1")), work, traces)
    assert tight["micro_batch_rows"] == 1 and tight["checkpointed_steps"] == 2 and tight["plan_fits"] == 0
    assert tight["working_memory_mb"] < 0
    assert math.isclose(tight["loss"], roomy["loss"], rel_tol=1e-5)  # the same steps from the same start
    assert all(torch.allclose(value, roomy_state[name], atol=1e-6) for name, value in get_adapter_state(model).items())
