"""OPSD client update: the privileged prompt, the teacher frozen at round start, cost accounting, a run."""

import math

import pytest
import torch
from helpers import (
    ScriptedGeneration,
    StubModel,
    completion_from_text,
    completion_logprobs,
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
import spearfl.runtime.evaluation
from spearfl.algorithms import opsd
from spearfl.algorithms.base import ClientRound, Trainer
from spearfl.config import EvalConfig, load_config
from spearfl.data.prompts import render_task
from spearfl.data.schema import Example
from spearfl.io import load_tensors
from spearfl.lm.generation import Completion
from spearfl.lm.models import (
    get_adapter_state,
    load_base_model,
    lora_parameters,
    set_adapter_state,
)
from spearfl.lm.training import right_align
from spearfl.runtime.evaluation import evaluate
from spearfl.runtime.local import run_local
from spearfl.runtime.run_folder import RunFolder
from spearfl.runtime.setup import build_context

SOLUTION = "Add the thousands first, then the rest."
FACTS = "Addition of whole numbers is exact."
SUM = Example(
    "t/sum", "What is four thousand plus eight hundred seventeen?", answer="4817", solution=SOLUTION, facts=FACTS
)
ANIMAL = multiple_choice("t/animal", "Which of these is an animal?", ("tree", "cat", "cup"), gold=1)
FRUIT = multiple_choice("t/fruit", "Which of these is a fruit?", ("apple", "rock", "car"), gold=0)
PRIVILEGED_TEXT = ("Correct answer", "4817", SOLUTION, FACTS, "(cat)")


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def work_order(examples, global_state, lr=1e-2, round_index=1, client_id=0):
    return ClientRound(client_id, round_index, list(examples), global_state, lr, run_seed=0)


def scripted(monkeypatch, tokenizer, script) -> ScriptedGeneration:
    generation = ScriptedGeneration(tokenizer, {example.question: answers for example, answers in script.items()})
    monkeypatch.setattr(spearfl.algorithms.base, "generate", generation)
    return generation


def perturbed_state(model, amount=0.02):
    """An adapter whose B matrices are not zero, so the round-start adapter differs from the bare base."""
    return {name: value + amount for name, value in get_adapter_state(model).items()}


# ---------------------------------------------------------------------------------------------- prompts


def test_privileged_prompt_holds_the_gold_answer_solution_and_facts_the_task_prompt_does_not(tokenizer):
    context = make_context(StubModel(), tokenizer, make_config())
    teacher = tokenizer.decode(context.prompts.privileged(SUM, ["answer", "solution", "facts"]))
    student = tokenizer.decode(context.prompts.task(SUM))
    assert render_task(SUM) in teacher
    assert "Correct answer: 4817" in teacher and SOLUTION in teacher and FACTS in teacher
    assert not any(text in student for text in PRIVILEGED_TEXT)
    only_answer = tokenizer.decode(context.prompts.privileged(SUM, ["answer"]))
    assert "4817" in only_answer and SOLUTION not in only_answer and FACTS not in only_answer
    multiple = tokenizer.decode(context.prompts.privileged(ANIMAL, ["answer", "solution", "facts"]))
    assert "Correct answer: B (cat)" in multiple  # an example without solution or facts gets the answer alone


def test_with_an_answer_prefix_teacher_and_student_prompts_end_alike(tokenizer):
    """The completion continues both prompts at the same point: after the written "Answer:"."""
    context = make_context(StubModel(), tokenizer, make_config("prompt.answer_prefix=true"))
    marker = tokenizer.encode("Answer:", add_special_tokens=False)
    for prompt in (context.prompts.task(ANIMAL), context.prompts.privileged(ANIMAL, ["answer"])):
        assert prompt[-len(marker):] == marker


def test_no_evaluation_prompt_holds_privileged_material(tokenizer, monkeypatch):
    seen = []

    def fake_generate(model, tokenizer_, prompts, **settings):
        seen.extend(prompts)
        return [Completion([], "", "eos") for _ in prompts]

    def fake_option_logprobs(model, prompts, options, batch_size, prefixes=None, end_ids=None):
        seen.extend(prompts)
        return [[0.0] * len(row) for row in options]

    monkeypatch.setattr(spearfl.runtime.evaluation, "generate", fake_generate)
    monkeypatch.setattr(spearfl.runtime.evaluation, "option_logprobs", fake_option_logprobs)
    monkeypatch.setattr(spearfl.runtime.evaluation, "line_end_ids", lambda model, tokenizer: [tokenizer.eos_token_id])
    context = make_context(StubModel(), tokenizer, make_config())
    evaluate(StubModel(), context.prompts, [SUM, ANIMAL], EvalConfig())
    assert len(seen) == 4  # two generated, one scored by option likelihood, one as a cloze item
    for prompt in seen:
        text = tokenizer.decode(prompt)
        assert not any(privileged in text for privileged in PRIVILEGED_TEXT), text


# ---------------------------------------------------------------------------------------------- the frozen teacher


def script_for(tokenizer):
    return {
        SUM: [completion_from_text(tokenizer, "It is 4000 + 817. Answer: 4817\n")],
        ANIMAL: [completion_from_text(tokenizer, "Answer: C\n")],
        FRUIT: [completion_from_text(tokenizer, "Answer: A\n", finished_by="eos")],
    }


def run_spied_round(tokenizer, monkeypatch, *overrides):
    """One OPSD round on a tiny model with scripted samples, recording what the teacher and the loss saw."""
    model = tiny_lora_model(tokenizer)
    script = script_for(tokenizer)
    generation = scripted(monkeypatch, tokenizer, script)
    record = {"teacher_calls": [], "loss_calls": [], "draws": [], "divergences": []}
    record["base_before"] = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    real_teacher, real_train, real_loss, real_draw = (
        opsd.teacher_logprobs, opsd.train, opsd.distillation_loss, opsd.draw
    )

    def spy_teacher(context, prompts, completions):
        record["teacher_calls"].append((prompts, completions))
        return real_teacher(context, prompts, completions)

    def spy_train(context, work, samples):
        record["samples"] = samples
        record["stored"] = [sample.teacher_logprobs.clone() for sample in samples]
        return real_train(context, work, samples)

    def spy_loss(teacher, student_logits, mask, *divergence):
        record["loss_calls"].append(teacher.detach().cpu().clone())
        record["divergences"].append(divergence[:2])  # the divergence and its beta; then the step's token count
        return real_loss(teacher, student_logits, mask, *divergence)

    def spy_draw(samples, count, rng):
        record["draws"].append(real_draw(samples, count, rng))
        return record["draws"][-1]

    monkeypatch.setattr(opsd, "teacher_logprobs", spy_teacher)
    monkeypatch.setattr(opsd, "draw", spy_draw)
    monkeypatch.setattr(opsd, "train", spy_train)
    monkeypatch.setattr(opsd, "distillation_loss", spy_loss)
    config = make_config("opsd.prompts_per_round=3", "opsd.local_steps=3", "opsd.batch_size=2", *overrides)
    context = make_context(model, tokenizer, config)
    global_state = perturbed_state(model)
    result = opsd.client_update(context, work_order(script, global_state))
    return model, context, global_state, result, record, generation


def test_teacher_is_scored_once_at_round_start_on_privileged_prompts_and_never_again(tokenizer, monkeypatch):
    model, context, global_state, result, record, generation = run_spied_round(tokenizer, monkeypatch)
    student_texts = [tokenizer.decode(p) for p in generation.calls[0].prompts]
    assert len(record["teacher_calls"]) == 1  # once, before training; never with an updated adapter
    privileged, completions = record["teacher_calls"][0]
    samples = record["samples"]
    assert [s.completion for s in samples] == completions
    assert [s.prompt for s in samples] == generation.calls[0].prompts  # the student trains under the task prompt
    for text, teacher_prompt in zip(student_texts, privileged):
        assert "Correct answer" in tokenizer.decode(teacher_prompt) and "Correct answer" not in text

    # The stored values are the round-start teacher's: a fresh computation with the global adapter gives them.
    set_adapter_state(model, global_state)
    fresh, _ = opsd.teacher_logprobs(context, privileged, completions)
    assert all(torch.equal(a, b) for a, b in zip(fresh, record["stored"]))
    assert all(torch.equal(s.teacher_logprobs, stored) for s, stored in zip(samples, record["stored"]))  # untouched
    # ... and, token by token, the privileged prompt's likelihood of the sampled ids (float16 rounding apart).
    exact = completion_logprobs(model, privileged, completions, batch_size=8)
    for row, ids, reference in zip(record["stored"], completions, exact):
        gathered = row.float().gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        assert torch.allclose(gathered, reference, atol=5e-3)  # float16 rounds a value in [8, 16) within 0.004
    student_view, _ = opsd.teacher_logprobs(context, [s.prompt for s in samples], completions)
    assert min(float((a.float() - b.float()).abs().max()) for a, b in zip(student_view, record["stored"])) > 0.02

    # Recomputed from the trained adapter, the teacher would differ: the loss used the stored values instead.
    set_adapter_state(model, result.state)
    drifted, _ = opsd.teacher_logprobs(context, privileged, completions)
    assert max(float((a.float() - b.float()).abs().max()) for a, b in zip(drifted, record["stored"])) > 0.05
    assert len(record["loss_calls"]) == len(record["draws"]) == 3
    position = {id(sample): index for index, sample in enumerate(samples)}
    for teacher, drawn in zip(record["loss_calls"], record["draws"]):
        assert len(drawn) == 2
        stored = [record["stored"][position[id(sample)]] for sample in drawn]
        uniform = -math.log(stored[0].shape[-1])
        assert torch.equal(teacher, right_align(stored, teacher.shape[1], uniform, torch.float32))


def test_training_moves_the_student_towards_the_stored_teacher(tokenizer):
    """A teacher the student can reach (the same model with other LoRA weights): training closes the gap."""
    model = tiny_lora_model(tokenizer)
    config = make_config("opsd.local_steps=8", "opsd.batch_size=2")
    context = make_context(model, tokenizer, config)
    script = script_for(tokenizer)
    prompts = [context.prompts.task(example) for example in script]
    completions = [answers[0].token_ids for answers in script.values()]
    start_state = get_adapter_state(model)
    set_adapter_state(model, perturbed_state(model, 0.1))
    teacher, _ = opsd.teacher_logprobs(context, prompts, completions)
    set_adapter_state(model, start_state)
    samples = [opsd.Sample(prompt, completion, row) for prompt, completion, row in zip(prompts, completions, teacher)]
    with torch.no_grad():
        before, _ = opsd.opsd_step(context, Trainer(context), samples)
    opsd.train(context, work_order(script, start_state), samples)
    with torch.no_grad():
        after, _ = opsd.opsd_step(context, Trainer(context), samples)
    assert after < 0.5 * before, (before, after)


def test_metrics_weight_and_exact_cost_accounting(tokenizer, monkeypatch):
    _, context, _, result, record, _ = run_spied_round(tokenizer, monkeypatch)
    metrics = result.metrics
    script = script_for(tokenizer)
    completions = [c.token_ids for answers in script.values() for c in answers]
    privileged, _ = record["teacher_calls"][0]
    assert result.weight == 3 and metrics["skipped"] == 0
    assert metrics["prompts"] == 3 and metrics["generations"] == 3
    assert metrics["first_try_correct"] == 2 and metrics["first_try_accuracy"] == pytest.approx(2 / 3)  # SUM, FRUIT
    assert not {"revised_correct", "revision_success", "wins", "losses"} & metrics.keys()  # no revisions in OPSD
    assert metrics["generated_tokens"] == sum(len(ids) for ids in completions)
    # The teacher's forward pass is counted apart; trained tokens are the student's passes with a backward.
    assert metrics["scored_tokens"] == sum(len(p) for p in privileged) + metrics["generated_tokens"]
    drawn = [sample for step in record["draws"] for sample in step]
    assert len(drawn) == 3 * 2  # local_steps x batch_size
    assert metrics["trained_tokens"] == sum(len(s.prompt) + len(s.completion) for s in drawn)
    for key in ("seconds", "generation_seconds", "feedback_seconds", "teacher_seconds", "training_seconds"):
        assert metrics[key] >= 0, key
    assert metrics["peak_memory_mb"] > 0
    assert metrics["loss"] > 0
    assert result.state.keys() == get_adapter_state(context.model).keys()


def test_the_default_divergence_is_kl_from_teacher_to_student(tokenizer, monkeypatch):
    *_, record, _ = run_spied_round(tokenizer, monkeypatch)
    assert record["divergences"] == [("forward_kl", 0.5)] * 3


def test_a_round_with_the_jsd_uses_it_and_trains_only_the_lora_weights(tokenizer, monkeypatch):
    model, _, global_state, result, record, _ = run_spied_round(
        tokenizer, monkeypatch, "opsd.divergence=jsd", "opsd.jsd_beta=0.3"
    )
    assert record["divergences"] == [("jsd", 0.3)] * 3  # every optimizer step's loss
    assert math.isfinite(result.metrics["loss"]) and result.metrics["loss"] > 0
    assert result.state.keys() == global_state.keys()
    assert any(not torch.equal(result.state[name], global_state[name]) for name in global_state)
    base_after = {name: p for name, p in model.named_parameters() if "lora_" not in name}
    assert base_after.keys() == record["base_before"].keys()
    assert all(torch.equal(p, record["base_before"][name]) for name, p in base_after.items())


# ---------------------------------------------------------------------------------------------- end to end


def test_one_round_through_the_local_runtime_trains_only_lora_and_counts_costs(tmp_path):
    assets = end_to_end_assets()
    overrides = ["algorithm=opsd", "server.rounds=1", "opsd.prompts_per_round=4", "opsd.local_steps=2"]
    config = load_config(write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run"), overrides)
    model, tokenizer = load_base_model(config.model.model_copy(update={"device": "cpu"}))
    context = build_context(config, model, tokenizer)
    base_before = {name: p.detach().clone() for name, p in context.model.named_parameters() if "lora_" not in name}
    run_local(config, show_progress=False, context=context)

    assert all(torch.equal(p, base_before[name]) for name, p in context.model.named_parameters() if "lora_" not in name)
    folder = RunFolder(config.output_dir)
    start, end = load_tensors(folder.adapter_path(0)), load_tensors(folder.adapter_path(1))
    assert any(not torch.equal(start[name], end[name]) for name in start)
    assert set(start) == set(lora_parameters(context.model))
    clients = read_history(tmp_path / "run")[1]["clients"]
    assert len(clients) == 2
    for client in clients:
        metrics = client["metrics"]
        assert client["weight"] == metrics["prompts"] == metrics["generations"] == 4
        assert metrics["generated_tokens"] > 0 and metrics["scored_tokens"] > metrics["generated_tokens"]
        assert metrics["trained_tokens"] > 0 and metrics["upload_bytes"] > 0 and metrics["skipped"] == 0
