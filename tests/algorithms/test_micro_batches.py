"""Every method's optimizer step gives the same gradient however the memory plan runs it: one batch, or one row at a
time with checkpointed layers and the vocabulary in chunks (`spearfl.lm.memory`). The plans are compared in float64,
where their only difference, the order of summation, is bounded far below float32 rounding (`PLAN_TOLERANCE`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import FLOAT32_UNIT_ROUNDOFF, make_config, make_context, tiny_lora_model

from spearfl.algorithms import base, grpo, opsd, rltf_sd, spear
from spearfl.algorithms.base import ClientRound, Trainer
from spearfl.algorithms.spear import Trace, protected_token_flags
from spearfl.lm import forward, training
from spearfl.lm.memory import StepPlan
from spearfl.lm.models import get_adapter_state, lora_parameters, set_adapter_state
from spearfl.losses.common import masked_mean
from spearfl.losses.distill import tempered_distillation_loss
from spearfl.personal import base as personal

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


TAP_WEIGHT, TAP_TEMPERATURE = 0.5, 2.0


def tap_samples(tokenizer) -> list:
    p = prompts(tokenizer)
    answers = [("Answer: A\n", True), ("So, Answer: B because\n", False), ("C", True)]
    return [personal.Sample(prompt, ids(tokenizer, text), correct) for prompt, (text, correct) in zip(p, answers)]


def tap_teacher(model) -> dict[str, torch.Tensor]:
    """A teacher adapter well away from the student's (the model's own)."""
    generator = torch.Generator().manual_seed(3)
    return {name: value.detach() + 0.05 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
            for name, value in lora_parameters(model).items()}


def tap_stage_two_step(tokenizer, context, trainer):
    samples = tap_samples(tokenizer)
    return personal.after_federation_step(context, trainer, samples, tap_teacher(context.model), TAP_WEIGHT, TAP_TEMPERATURE)


def gradients_under(plan, step, tokenizer, monkeypatch, overrides=(), dtype=torch.float32, plans=True):
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
    assert trainer.plans == ([plan] if plans else [])
    return loss, parts, {name: p.grad.clone() for name, p in lora_parameters(model).items()}


# Micro-batches, checkpointed recomputation and a chunked vocabulary change only the order in which the same float
# terms are summed. Run in float64, a correct plan then differs from the one-batch float64 step by at most
# gamma_n * (sum of |terms|) with unit roundoff 2^-53: for it to reach one float32 rounding (2^-24 of the result)
# the sum would have to cancel 2^29-fold, and the float32 step itself would be meaningless. A plan that loses a
# row, a chunk or a factor is off by a share of the result, millions of times that bound. The bound holds on any CPU,
# whatever the order its kernels sum in.
PLAN_TOLERANCE = FLOAT32_UNIT_ROUNDOFF


def relative_error(got, reference) -> float:
    got, reference = (torch.as_tensor(value, dtype=torch.float64) for value in (got, reference))
    return float((got - reference).norm()) / max(float(reference.norm()), torch.finfo(torch.float64).tiny)


@dataclass
class Measured:
    """A step's loss, parts and gradients in float64, in one batch (the reference) and under a plan."""

    reference: tuple
    planned: tuple


def measure(plan, step, tokenizer, monkeypatch, overrides=()) -> Measured:
    """Run the step in float64 in one batch, then under `plan` (whatever `monkeypatch` broke)."""
    reference = gradients_under(ONE_BATCH, step, tokenizer, monkeypatch, overrides, dtype=torch.float64)
    return Measured(reference, gradients_under(plan, step, tokenizer, monkeypatch, overrides, dtype=torch.float64))


def worst_error(measured: Measured) -> tuple[float, str]:
    """The largest `relative_error` of the planned run over its loss, its parts and each gradient, and where."""
    (loss64, parts64, grads64), (loss, parts, grads) = measured.reference, measured.planned
    assert parts.keys() == parts64.keys() and grads.keys() == grads64.keys()
    quantities = {"loss": (loss, loss64)}
    # trained_tokens is a count, compared exactly by the tests
    quantities.update({key: (parts[key], parts64[key]) for key in parts if key != "trained_tokens"})
    quantities.update({name: (grads[name], grads64[name]) for name in grads})
    errors = {key: relative_error(*values) for key, values in quantities.items()}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


STEPS = [spear_step, grpo_step, rltf_sd_step, opsd_step, tap_stage_two_step]
# OPSD needs whole logits: its vocabulary is never chunked
CHUNKED_STEPS = [spear_step, grpo_step, rltf_sd_step, tap_stage_two_step]


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.__name__)
@pytest.mark.parametrize("plan", [ROW_BY_ROW, PAIRS], ids=["row by row, checkpointed, vocabulary in chunks", "pairs"])
def test_micro_batches_give_the_one_batch_gradient(tokenizer, monkeypatch, step, plan):
    measured = measure(plan, step, tokenizer, monkeypatch)
    assert measured.planned[1]["trained_tokens"] == measured.reference[1]["trained_tokens"]
    error, where = worst_error(measured)
    assert error <= PLAN_TOLERANCE, f"{where}: off by {error:.2e} of its size in float64 (bound {PLAN_TOLERANCE:.1e})"


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
    distilling = forward._ChunkedDistillation

    class DistillingWithoutLastChunk(distilling):
        @staticmethod
        def forward(ctx, hidden, teacher_hidden, weight, bias, targets, temperature, chunk):
            ctx.last = (hidden.shape[0] - 1) // chunk * chunk
            dropped = torch.arange(ctx.last, hidden.shape[0])
            return tuple(value.index_fill(0, dropped, 0.0) for value in distilling.forward(ctx, hidden, teacher_hidden, weight, bias, targets, temperature, chunk))

        @staticmethod
        def backward(ctx, *upstream):
            hidden_gradient, *rest = distilling.backward(ctx, *upstream)
            hidden_gradient[ctx.last :] = 0
            return hidden_gradient, *rest

    monkeypatch.setattr(forward, "_ChunkedDistillation", DistillingWithoutLastChunk)


@pytest.mark.parametrize(
    "step, mistake",
    [(step, drop_the_last_row) for step in STEPS] + [(step, drop_the_last_chunk) for step in CHUNKED_STEPS],
    ids=lambda value: value.__name__,
)
def test_the_gradient_check_catches_a_lost_row_or_chunk(tokenizer, monkeypatch, step, mistake):
    reference = gradients_under(ONE_BATCH, step, tokenizer, monkeypatch, dtype=torch.float64)
    mistake(monkeypatch)
    planned = gradients_under(ROW_BY_ROW, step, tokenizer, monkeypatch, dtype=torch.float64)
    error, where = worst_error(Measured(reference, planned))
    assert error > 1000 * PLAN_TOLERANCE, f"{where}: off by only {error:.2e} of its size"


def test_the_grpo_temperature_reaches_the_chunked_log_probs(tokenizer, monkeypatch):
    overrides = ("generation.temperature=0.5",)
    measured = measure(ROW_BY_ROW, grpo_step, tokenizer, monkeypatch, overrides)
    error, where = worst_error(measured)
    assert error <= PLAN_TOLERANCE, f"{where}: off by {error:.2e} of its size in float64"
    _, _, at_one = gradients_under(ONE_BATCH, grpo_step, tokenizer, monkeypatch, dtype=torch.float64)
    reference = measured.reference[2]
    assert all(relative_error(at_one[name], reference[name]) > 1000 * PLAN_TOLERANCE for name in reference)


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
    set_adapter_state(model, work.global_state)
    assert roomy["micro_batch_rows"] == 3 and roomy["checkpointed_steps"] == 0 and roomy["plan_fits"] == 1
    assert roomy["vocabulary_chunk"] > 0 and 0 < roomy["planned_working_mb"] <= roomy["working_memory_mb"]
    tight = spear.train(make_context(model, tokenizer, make_config("client.local_steps=2", "client.memory_budget_mb=1")), work, traces)
    assert tight["micro_batch_rows"] == 1 and tight["checkpointed_steps"] == 2 and tight["plan_fits"] == 0
    assert tight["working_memory_mb"] < 0
    # the same steps from the same start, in float64: the tight plan's steps are the roomy plan's, up to the order of summation
    twin = model.to(torch.float64)
    set_adapter_state(twin, work.global_state)
    exact = spear.train(make_context(twin, tokenizer, make_config("client.local_steps=2")), work, traces)
    exact_state = {name: parameter.detach().clone() for name, parameter in lora_parameters(twin).items()}
    set_adapter_state(twin, work.global_state)
    planned = spear.train(make_context(twin, tokenizer, make_config("client.local_steps=2", "client.memory_budget_mb=1")), work, traces)
    assert planned["micro_batch_rows"] == 1 and planned["checkpointed_steps"] == 2
    assert relative_error(planned["loss"], exact["loss"]) <= PLAN_TOLERANCE
    planned_state = {name: parameter.detach().clone() for name, parameter in lora_parameters(twin).items()}
    assert planned_state.keys() == exact_state.keys()
    for name, value in planned_state.items():
        assert relative_error(value - work.global_state[name].double(), exact_state[name] - work.global_state[name].double()) <= PLAN_TOLERANCE, name


def tap_stage_two_by_hand(tokenizer, context, trainer):
    """TAP's stage-2 loss written out: the teacher's log-probs from a forward of its own adapter first, then the
    student's cross-entropy on its correct answers plus weight x T^2 KL(teacher || student)."""
    model, samples = context.model, tap_samples(tokenizer)
    batch = training.collate([s.prompt for s in samples], [s.completion for s in samples], tokenizer.pad_token_id, torch.device("cpu"))
    student = get_adapter_state(model)
    set_adapter_state(model, tap_teacher(model))
    with torch.no_grad():
        teacher = torch.log_softmax(training.completion_logits(model, batch), dim=-1)
    set_adapter_state(model, student)
    logits = training.completion_logits(model, batch)
    wins = batch.completion_mask & torch.tensor([s.correct for s in samples]).unsqueeze(-1)
    task = masked_mean(-forward.token_logprobs(logits, batch.targets), wins, int(wins.sum()))
    loss = task + TAP_WEIGHT * tempered_distillation_loss(teacher, logits, batch.completion_mask, TAP_TEMPERATURE, len(samples))
    loss.backward()
    return float(loss.detach()), {}


def keep_the_teacher_in_place(monkeypatch):
    """The mistake of a teacher pass that leaves the teacher's weights in the model: the student trains as the teacher."""
    monkeypatch.setattr(personal, "under_adapter", no_restore)


def no_restore(model, state, forward):
    set_adapter_state(model, state)
    with torch.no_grad():
        return forward()


def never_load_the_teacher(monkeypatch):
    """The mistake of a teacher pass that scores with the student's own weights: the distillation pulls towards itself."""

    def own_weights(model, state, forward):
        with torch.no_grad():
            return forward()

    monkeypatch.setattr(personal, "under_adapter", own_weights)


def test_tap_stage_two_distils_from_the_teacher_adapter_and_trains_the_student(tokenizer, monkeypatch):
    """The teacher is scored micro-batch by micro-batch, its adapter swapped in and the student's put back: row by row
    and checkpointed, in float64, the step is the loss written out with a separate teacher forward."""
    _, _, by_hand = gradients_under(ONE_BATCH, tap_stage_two_by_hand, tokenizer, monkeypatch, dtype=torch.float64, plans=False)
    _, parts, planned = gradients_under(ROW_BY_ROW, tap_stage_two_step, tokenizer, monkeypatch, dtype=torch.float64)
    assert parts["scored_tokens"] == parts["trained_tokens"] > 0
    errors = {name: relative_error(planned[name], by_hand[name]) for name in by_hand}
    assert max(errors.values()) <= PLAN_TOLERANCE, max(errors.items(), key=lambda item: item[1])


@pytest.mark.parametrize("mistake", [keep_the_teacher_in_place, never_load_the_teacher], ids=lambda value: value.__name__)
def test_the_stage_two_check_catches_a_teacher_left_in_or_never_loaded(tokenizer, monkeypatch, mistake):
    _, _, by_hand = gradients_under(ONE_BATCH, tap_stage_two_by_hand, tokenizer, monkeypatch, dtype=torch.float64, plans=False)
    mistake(monkeypatch)
    _, _, planned = gradients_under(ROW_BY_ROW, tap_stage_two_step, tokenizer, monkeypatch, dtype=torch.float64)
    assert max(relative_error(planned[name], by_hand[name]) for name in by_hand) > 1000 * PLAN_TOLERANCE
