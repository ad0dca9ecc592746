import pytest
import torch
from helpers import (
    completion_from_text,
    completion_logprobs,
    single_thread,
    tiny_lora_model,
)

import spearfl.runtime.evaluation as evaluation
from spearfl.config import EvalConfig
from spearfl.data.prompts import PromptFormat
from spearfl.data.schema import Example
from spearfl.lm.forward import option_logprobs
from spearfl.lm.generation import SamplingSettings, generate
from spearfl.runtime.evaluation import evaluate, generation_metrics, loglik_predictions


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def letters(uid: str, num_options: int, gold: int, **fields) -> Example:
    options = tuple(f"option {uid} {index}" for index in range(num_options))
    return Example(uid, f"Question {uid}?", options, gold, **fields)


def test_generation_metrics_count_accuracy_parse_rate_and_answer_share():
    examples = [letters("a", 3, 0), letters("b", 3, 1), letters("c", 5, 2), letters("d", 5, 0)]
    texts = ["Answer: A\n", "Answer: C\n", "I am not sure.", "Answer: a\n"]  # "a" is the article, not A
    metrics = generation_metrics(examples, texts)
    assert metrics["accuracy"] == pytest.approx(1 / 4)
    assert metrics["parse_rate"] == pytest.approx(2 / 4)
    assert metrics["answer_share"] == {"A": pytest.approx(0.5), "C": pytest.approx(0.5)}


def test_generation_metrics_five_options_and_nothing_parsed():
    examples = [letters("a", 5, 4), letters("b", 5, 4)]
    assert generation_metrics(examples, ["Answer: E\n", "Answer: E\n"]) == {
        "accuracy": 1.0, "parse_rate": 1.0, "answer_share": {"E": 1.0}
    }
    assert generation_metrics(examples, ["no idea", "Answer:"]) == {"accuracy": 0.0, "parse_rate": 0.0, "answer_share": {}}


def test_generation_metrics_free_form_has_no_answer_share():
    examples = [Example("f/0", "2 + 2?", answer="4"), Example("f/1", "3 + 3?", answer="6")]
    metrics = generation_metrics(examples, ["Answer: 4\n", "Answer: 7\n"])
    assert metrics == {"accuracy": 0.5, "parse_rate": 1.0}


def test_generation_metrics_of_a_mixed_set_do_not_depend_on_its_order():
    """A user JSONL may mix multiple choice and free-form items (examples/custom.jsonl does)."""
    free_form = Example("f/0", "Sam has 12 apples and gives away 5. How many are left?", answer="7")
    choices = [letters("a", 3, 0), letters("b", 3, 1)]
    texts = {"f/0": "Answer: 7\n", "a": "Answer: A\n", "b": "Answer: C\n"}
    first = generation_metrics([free_form, *choices], [texts[e.uid] for e in [free_form, *choices]])
    last = generation_metrics([*choices, free_form], [texts[e.uid] for e in [*choices, free_form]])
    assert first == last
    assert last["answer_share"] == {"A": pytest.approx(0.5), "C": pytest.approx(0.5)}  # labels of options only


def test_loglik_predictions_pick_the_most_likely_option(tokenizer, monkeypatch):
    prompt_format = PromptFormat(tokenizer, answer_prefix=False)
    examples = [letters("a", 3, 0), letters("b", 5, 4), letters("c", 2, 1)]
    prompts = [prompt_format.task(example) for example in examples]
    chosen = {"a": "A", "b": "E", "c": "A"}
    rows = []

    def scripted_option_logprobs(model, row_prompts, row_options, batch_size, prefixes=None, end_ids=None):
        scores = []
        for prompt, options in zip(row_prompts, row_options):
            example = examples[prompts.index(prompt)]
            row_scores = []
            for completion in options:
                label = tokenizer.decode(completion).removeprefix("Answer: ")
                rows.append((example.uid, label, completion))
                row_scores.append(-0.5 if label == chosen[example.uid] else -1.5)
            scores.append(row_scores)
        return scores

    monkeypatch.setattr(evaluation, "option_logprobs", scripted_option_logprobs)
    predictions = loglik_predictions(None, prompt_format, examples, prompts, batch_size=4)
    assert predictions["loglik"] == [0, 4, 0]
    assert [(uid, label) for uid, label, _ in rows] == [
        ("a", "A"), ("a", "B"), ("a", "C"), ("b", "A"), ("b", "B"), ("b", "C"), ("b", "D"), ("b", "E"), ("c", "A"), ("c", "B")
    ]
    assert all(completion == prompt_format.option_completion(label) for _, label, completion in rows)


def test_loglik_predictions_agree_with_completion_logprobs(tokenizer):
    model = tiny_lora_model(tokenizer, seed=5)
    prompt_format = PromptFormat(tokenizer, answer_prefix=False)
    examples = [letters(str(index), 3 + index % 3, 0) for index in range(6)]
    prompts = [prompt_format.task(example) for example in examples]
    predictions = loglik_predictions(model, prompt_format, examples, prompts, batch_size=4)
    for index, (example, prompt) in enumerate(zip(examples, prompts)):
        completions = [prompt_format.option_completion(label) for label in example.labels]
        totals = [float(row.sum()) for row in completion_logprobs(model, [prompt] * len(completions), completions, 8)]
        per_character = [total / len(prompt_format.option_line(label)) for total, label in zip(totals, example.labels)]
        assert predictions["loglik"][index] == max(range(len(totals)), key=totals.__getitem__)
        assert predictions["loglik_norm"][index] == max(range(len(totals)), key=per_character.__getitem__)


def test_evaluate_uses_the_task_prompts_and_reports_every_metric(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer, seed=5)
    prompt_format = PromptFormat(tokenizer, answer_prefix=False)
    examples = [letters("a", 3, 0, facts="Secret fact."), letters("b", 5, 3, solution="Secret solution.")]
    seen = {"generate": [], "loglik": [], "cloze": []}

    def spy_generate(model_, tokenizer_, prompts, **settings):
        seen["generate"].append((prompts, settings))
        return generate(model_, tokenizer_, prompts, **settings)

    def spy_option_logprobs(model_, prompts, options, batch_size, prefixes=None, end_ids=None):
        seen["loglik" if end_ids else "cloze"].append(prompts)
        return option_logprobs(model_, prompts, options, batch_size, prefixes, end_ids)

    monkeypatch.setattr(evaluation, "generate", spy_generate)
    monkeypatch.setattr(evaluation, "option_logprobs", spy_option_logprobs)
    settings = EvalConfig(methods=["loglik", "cloze", "generate"], batch_size=4, max_new_tokens=3)
    metrics = evaluate(model, prompt_format, examples, settings)
    expected = [prompt_format.task(example) for example in examples]
    (prompts, sampling), = seen["generate"]
    assert prompts == expected
    assert sampling["settings"].temperature == 0 and sampling["settings"].max_new_tokens == 3
    assert {tuple(prompt) for prompt in seen["loglik"][0]} == {tuple(prompt) for prompt in expected}
    assert [tokenizer.decode(prompt) for prompt in seen["cloze"][0]] == ["Question: Question a?\nAnswer:", "Question: Question b?\nAnswer:"]
    for prompt in prompts + seen["cloze"][0]:
        assert "Secret" not in tokenizer.decode(prompt)
    assert set(metrics) == {
        "num_examples", "loglik_accuracy", "loglik_norm_accuracy", "loglik_answer_share", "cloze_accuracy",
        "cloze_norm_accuracy", "accuracy", "parse_rate", "answer_share", "mean_completion_tokens",
    }
    assert metrics["num_examples"] == 2 and metrics["accuracy"] == 0.0 and metrics["parse_rate"] == 0.0  # a random model
    assert sum(metrics["loglik_answer_share"].values()) == pytest.approx(1.0)
    assert 1 <= metrics["mean_completion_tokens"] <= 3


def test_evaluate_scores_scripted_answers_and_gold_index_zero(tokenizer, monkeypatch):
    examples = [letters("a", 3, 0), letters("b", 5, 4), letters("c", 4, 1)]
    answers = {"a": " A\n", "b": " E\n", "c": " D\n"}
    prompt_format = PromptFormat(tokenizer, answer_prefix=True)
    prompts = {tuple(prompt_format.task(example)): example.uid for example in examples}

    def scripted_generate(model, tokenizer_, prompts_, **settings):
        assert settings["settings"].text_prefix == "Answer:"
        return [completion_from_text(tokenizer, answers[prompts[tuple(prompt)]]) for prompt in prompts_]

    def scripted_option_logprobs(model, row_prompts, row_options, batch_size, prefixes=None, end_ids=None):
        # Every example's first option is the most likely: right for "a" (gold index 0) only.
        return [[0.0 if c == prompt_format.option_completion("A") else -1.0 for c in options] for options in row_options]

    monkeypatch.setattr(evaluation, "generate", scripted_generate)
    monkeypatch.setattr(evaluation, "option_logprobs", scripted_option_logprobs)
    monkeypatch.setattr(evaluation, "line_end_ids", lambda model, tokenizer: [tokenizer.eos_token_id])
    model = torch.nn.Linear(1, 1)
    metrics = evaluate(model, prompt_format, examples, EvalConfig(methods=["loglik", "generate"], batch_size=4))
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["parse_rate"] == 1.0
    assert metrics["answer_share"] == {"A": pytest.approx(1 / 3), "D": pytest.approx(1 / 3), "E": pytest.approx(1 / 3)}
    assert metrics["loglik_accuracy"] == pytest.approx(1 / 3)
    assert metrics["loglik_answer_share"] == {"A": 1.0}


def test_answer_shares_group_varied_option_texts_by_position():
    examples = [
        Example(uid="t/1", question="Fruit?", options=("apple", "stone"), gold=0, label_style="text"),
        Example(uid="t/2", question="Metal?", options=("wood", "iron"), gold=1, label_style="text"),
        Example(uid="t/3", question="Sky?", options=("blue", "grass"), gold=0, label_style="text"),
    ]
    metrics = generation_metrics(examples, ["Answer: apple", "Answer: wood", "Answer: no idea"])
    assert metrics["answer_share"] == {"option 1": 1.0}
    yes_no = [Example(uid=f"y/{i}", question="?", options=("Yes", "No"), gold=i % 2, label_style="text") for i in range(2)]
    assert generation_metrics(yes_no, ["Answer: Yes", "Answer: No"])["answer_share"] == {"No": 0.5, "Yes": 0.5}


def test_generation_reuses_the_prompts_the_option_scoring_ran(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer, seed=5)
    prompt_format = PromptFormat(tokenizer, answer_prefix=False)
    examples = [letters(str(index), 3, index % 3) for index in range(6)]
    settings = EvalConfig(methods=["loglik", "generate"], batch_size=4, max_new_tokens=3)
    prefill_widths = []

    def spy_generate(model_, tokenizer_, prompts, **sampling):
        hook = model_.register_forward_pre_hook(lambda module, args, kwargs: prefill_widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        try:
            return generate(model_, tokenizer_, prompts, **sampling)
        finally:
            hook.remove()

    monkeypatch.setattr(evaluation, "generate", spy_generate)
    reused = evaluate(model, prompt_format, examples, settings)
    assert set(prefill_widths) == {1}  # every prompt was run by the scoring: generation feeds one token at a time
    prompts = [prompt_format.task(example) for example in examples]
    generated = generate(model, tokenizer, prompts, settings=SamplingSettings(3, 0.0, 1.0, 4), seed=0)
    assert reused["mean_completion_tokens"] == sum(len(c.token_ids) for c in generated) / len(generated)
    assert reused["accuracy"] == generation_metrics(examples, [c.text for c in generated])["accuracy"]


def test_line_end_ids_hold_eos_and_line_breaks_but_no_words(tokenizer, tiny_model):
    from spearfl.lm.generation import line_end_ids

    ids = set(line_end_ids(tiny_model, tokenizer))
    assert tokenizer.eos_token_id in ids
    for text in ("\n", "\n\n", ".\n"):
        assert all(token in ids for token in tokenizer.encode(text, add_special_tokens=False)[-1:])
    for text in (" Paris", "fish", ".", " "):
        assert not set(tokenizer.encode(text, add_special_tokens=False)) & ids


def test_cloze_scores_each_option_text_after_the_bare_question(tokenizer, monkeypatch):
    prompt_format = PromptFormat(tokenizer, answer_prefix=True)
    examples = [
        Example("c/0", "Which planet has rings?", ("Mars", "the ringed gas giant Saturn"), 1, label_style="letters"),
        Example("c/1", "A cat has", ("four legs", "two"), 0, cloze_context="A cat has"),
    ]
    seen = []

    def scripted(model, prompts, options, batch_size, prefixes=None, end_ids=None):
        seen.append(([tokenizer.decode(p) for p in prompts], [[tokenizer.decode(o) for o in row] for row in options], end_ids))
        # Totals favour the short option; per character the long one.
        return [[-2.0, -6.0] for _ in options]

    monkeypatch.setattr(evaluation, "option_logprobs", scripted)
    predictions = evaluation.cloze_predictions(None, prompt_format, examples, batch_size=4)
    (contexts, continuations, end_ids), = seen
    assert contexts == ["Question: Which planet has rings?\nAnswer:", "A cat has"]  # no options listed, no chat turn
    assert continuations == [[" Mars", " the ringed gas giant Saturn"], [" four legs", " two"]]
    assert end_ids is None
    # Per character: -2/5 < -6/27, so Saturn; -2/10 > -6/4, so four legs.
    assert predictions == {"cloze": [0, 0], "cloze_norm": [1, 0]}


def test_best_options_by_total_and_per_character():
    assert evaluation.best_options([[-3.0, -4.0], [-1.0, -0.5]]) == [0, 1]
    assert evaluation.best_options([[-3.0, -4.0], [-1.0, -0.5]], [[1, 4], [2, 1]]) == [1, 0]
