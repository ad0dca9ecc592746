"""Every method's optimizer step gives the same gradient however the memory plan runs it: one batch, or one row at a
time with checkpointed layers and the vocabulary in chunks (`spearfl.lm.memory`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import (
    ROUNDING_FACTOR,
    assert_float32_close,
    make_config,
    make_context,
    rounding_excess,
    tiny_lora_model,
)

from spearfl.algorithms import base, grpo, opsd, rltf_sd, spear
from spearfl.algorithms.base import ClientRound, Trainer
from spearfl.algorithms.spear import Trace, protected_token_flags
from spearfl.lm import forward, training
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


def gradients_under(plan, step, tokenizer, monkeypatch, overrides=(), dtype=torch.float32):
    """The step's loss, parts and LoRA gradients under `plan`, with the tiny model in `dtype` (float64: the reference)."""
    model = tiny_lora_model(tokenizer, seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(2))  # B = 0 would hide A's gradients
    model.to(dtype)
    context = make_context(model, tokenizer, make_config("spear.margin=0.0", "spear.lambda_anchor=0.1", *overrides))
    monkeypatch.setattr(base, "plan_step", lambda *args, **kwargs: plan)
    trainer = Trainer(context)
    model.train()
    loss, parts = step(tokenizer, context, trainer)
    assert trainer.plans == [plan]
    return loss, parts, {name: p.grad.clone() for name, p in lora_parameters(model).items()}


@dataclass
class Measured:
    """A step's loss, parts and gradients three ways: the plain float32 batch, its float64 reference, and `plan`."""

    plain: tuple
    reference: tuple
    planned: tuple


def measure(plan, step, tokenizer, monkeypatch, overrides=()) -> Measured:
    """Run the step plain in float32 and float64, then under `plan` in float32 (whatever `monkeypatch` broke)."""
    plain = gradients_under(ONE_BATCH, step, tokenizer, monkeypatch, overrides)
    reference = gradients_under(ONE_BATCH, step, tokenizer, monkeypatch, overrides, dtype=torch.float64)
    return Measured(plain, reference, gradients_under(plan, step, tokenizer, monkeypatch, overrides))


def worst_excess(measured: Measured) -> tuple[float, str]:
    """The largest `rounding_excess` of the planned run over its loss, its parts and each gradient, and where."""
    (plain_loss, plain_parts, plain_grads), (loss64, parts64, grads64) = measured.plain, measured.reference
    loss, parts, grads = measured.planned
    assert parts.keys() == plain_parts.keys() and grads.keys() == plain_grads.keys()
    quantities = {"loss": (loss, plain_loss, loss64)}
    # trained_tokens is a count, compared exactly by the tests
    quantities.update({key: (parts[key], plain_parts[key], parts64[key]) for key in parts if key != "trained_tokens"})
    quantities.update({name: (grads[name], plain_grads[name], grads64[name]) for name in grads})
    excess = {key: rounding_excess(*(torch.as_tensor(value, dtype=torch.float64) for value in values)) for key, values in quantities.items()}
    worst = max(excess, key=excess.get)
    return excess[worst], worst


STEPS = [spear_step, grpo_step, rltf_sd_step, opsd_step]
CHUNKED_STEPS = [spear_step, grpo_step, rltf_sd_step]  # OPSD needs whole logits: its vocabulary is never chunked


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.__name__)
@pytest.mark.parametrize("plan", [ROW_BY_ROW, PAIRS], ids=["row by row, checkpointed, vocabulary in chunks", "pairs"])
def test_micro_batches_give_the_one_batch_gradient(tokenizer, monkeypatch, step, plan):
    measured = measure(plan, step, tokenizer, monkeypatch)
    assert measured.planned[1]["trained_tokens"] == measured.plain[1]["trained_tokens"]
    excess, where = worst_excess(measured)
    assert excess <= ROUNDING_FACTOR, f"{where}: {excess:.1f} times the one-batch float32 rounding"


def drop_the_last_row(monkeypatch):
    """The mistake of a micro-batch that loses one row's loss term: its last group runs without its last row."""
    planned = training.micro_batches

    def dropping(lengths, rows):
        groups = planned(lengths, rows)
        return groups[:-1] + [groups[-1][:-1]] if len(groups[-1]) > 1 else groups[:-1]

    monkeypatch.setattr(training, "micro_batches", dropping)


def drop_the_last_chunk(monkeypatch):
    """The mistake of a chunked vocabulary that skips its last chunk: those positions score 0 and get no gradient."""
    chunked = forward._ChunkedTargetLogprobs

    class DroppingLastChunk(chunked):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk):
            ctx.last = (hidden.shape[0] - 1) // chunk * chunk
            return chunked.forward(ctx, hidden, weight, bias, targets, temperature, chunk).index_fill(0, torch.arange(ctx.last, hidden.shape[0]), 0.0)

        @staticmethod
        def backward(ctx, upstream):
            hidden_gradient, *rest = chunked.backward(ctx, upstream)
            hidden_gradient[ctx.last :] = 0
            return hidden_gradient, *rest

    monkeypatch.setattr(forward, "_ChunkedTargetLogprobs", DroppingLastChunk)


@pytest.mark.parametrize(
    "step, mistake",
    [(step, drop_the_last_row) for step in STEPS] + [(step, drop_the_last_chunk) for step in CHUNKED_STEPS],
    ids=lambda value: value.__name__,
)
def test_the_gradient_check_catches_a_lost_row_or_chunk(tokenizer, monkeypatch, step, mistake):
    plain = gradients_under(ONE_BATCH, step, tokenizer, monkeypatch)
    reference = gradients_under(ONE_BATCH, step, tokenizer, monkeypatch, dtype=torch.float64)
    mistake(monkeypatch)
    planned = gradients_under(ROW_BY_ROW, step, tokenizer, monkeypatch)
    excess, where = worst_excess(Measured(plain, reference, planned))
    assert excess > 100 * ROUNDING_FACTOR, f"{where}: only {excess:.1f} times float32 rounding"


def test_the_grpo_temperature_reaches_the_chunked_log_probs(tokenizer, monkeypatch):
    overrides = ("generation.temperature=0.5",)
    measured = measure(ROW_BY_ROW, grpo_step, tokenizer, monkeypatch, overrides)
    excess, where = worst_excess(measured)
    assert excess <= ROUNDING_FACTOR, f"{where}: {excess:.1f} times the one-batch float32 rounding"
    _, _, at_one = gradients_under(ONE_BATCH, grpo_step, tokenizer, monkeypatch, dtype=torch.float64)
    reference = measured.reference[2]
    assert all(rounding_excess(at_one[name], measured.plain[2][name], reference[name]) > 100 * ROUNDING_FACTOR for name in reference)


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
    tight_state = get_adapter_state(model)
    # the same steps from the same start: as close to the roomy steps in float64 as the roomy float32 steps are
    twin = model.to(torch.float64)
    set_adapter_state(twin, work.global_state)
    exact = spear.train(make_context(twin, tokenizer, make_config("client.local_steps=2")), work, traces)
    assert_float32_close(tight["loss"], roomy["loss"], exact["loss"], "loss")
    exact_state = {name: parameter.detach().clone() for name, parameter in lora_parameters(twin).items()}
    assert exact_state.keys() == tight_state.keys()
    for name, value in tight_state.items():
        assert_float32_close(value, roomy_state[name], exact_state[name], name)
