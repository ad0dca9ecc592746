"""Programmatic verifiers and the LLM judge as feedback providers: verdicts, hints and config errors."""

import doctest

import pytest
from helpers import completion_logprobs, single_thread, tiny_lora_model

from spearfl.config import ConfigError, load_config
from spearfl.data.schema import Example
from spearfl.feedback import verifiers
from spearfl.feedback.judge import Judge
from spearfl.feedback.providers import make_provider
from spearfl.runtime.setup import check_config, client_feedback

PLANETS = Example(uid="v/p", question="Which planet has rings?", options=("Mars", "Saturn"), gold=1, label_style="text")
SUM = Example(uid="v/s", question="What is 1,200 + 34?", answer="1234", solution="Add the hundreds first. Then the rest.")
TRICKY = Example(uid="v/t", question="Write one plus one in symbols.", answer="1+1")


def test_the_docstring_examples_hold():
    assert doctest.testmod(verifiers).failed == 0


def test_numeric_verifier_compares_numbers_within_the_tolerance():
    assert verifiers.numeric()(SUM, "Answer: 1,234")
    assert not verifiers.numeric()(SUM, "Answer: 1235")
    assert verifiers.numeric(1e-3)(SUM, "Answer: 1234.5")
    assert not verifiers.numeric()(SUM, "I think it is 1234")  # no answer line
    assert not verifiers.numeric()(PLANETS, "Answer: Saturn")  # no number on either side


def test_exact_and_regex_verifiers_read_the_answer_line():
    assert verifiers.exact(PLANETS, "Answer: saturn.\n") and not verifiers.exact(PLANETS, "Answer: Saturn V")
    assert verifiers.regex(r"^{answer}$")(TRICKY, "Answer: 1+1")  # the gold is escaped: "+" is no quantifier
    assert not verifiers.regex(r"^{answer}$")(TRICKY, "Answer: 11")
    assert verifiers.regex(r"\b{answer}\b")(PLANETS, "Answer: it is Saturn")


def test_a_named_python_function_gives_the_verdict(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text("def long_enough(example, text):\n    return len(text) > 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = verifiers.python_function("my_checks:long_enough")
    assert check(SUM, "Answer: 1234 apples") and not check(SUM, "Answer: 1")
    for name, words in (("my_checks", "module:function"), ("my_checks:missing", "missing"), ("nowhere:f", "nowhere")):
        with pytest.raises(ValueError, match=words):
            verifiers.python_function(name)


def test_a_verifier_provider_hints_like_the_oracle():
    provider = make_provider(verifiers.numeric(), "solution_steps", 1, remind_format=True)
    right, wrong, unparsed = provider(SUM, "Answer: 1234"), provider(SUM, "Answer: 1000"), provider(SUM, "no idea")
    assert right.correct and right.hint is None
    assert not wrong.correct and wrong.hint == "Add the hundreds first."
    assert not unparsed.correct and unparsed.hint.startswith("Your answer does not end with a number.")


def test_configs_name_what_a_provider_lacks(tmp_path, monkeypatch):
    for provider, field in (("regex", "pattern"), ("python", "function"), ("judge", "judge_model")):
        with pytest.raises(ConfigError, match=f"needs feedback.{field}"):
            load_config(None, [f"feedback.provider={provider}"])
    with pytest.raises(ConfigError, match="feedback.function"):
        check_config(load_config(None, ["feedback.provider=python", "feedback.function=nowhere:f"]))
    with pytest.raises(ConfigError, match="feedback.pattern"):
        check_config(load_config(None, ["feedback.provider=regex", "feedback.pattern=(unclosed"]))
    exact = client_feedback(load_config(None, ["feedback.provider=exact"]))
    assert exact(PLANETS, "Answer: Saturn").correct and not exact(PLANETS, "Answer: Mars").correct


def test_the_judge_says_yes_where_the_model_finds_yes_likelier(tokenizer):
    with single_thread():
        model = tiny_lora_model(tokenizer)
        judge = Judge(model, tokenizer)
        answers = ["Answer: Saturn", "Answer: Mars", "Answer: Jupiter", "Nothing"]
        verdicts = judge.verdicts([PLANETS] * len(answers), answers)
        for answer, verdict in zip(answers, verdicts):
            prompt = judge.prompt(PLANETS, answer)
            yes, no = (completion_logprobs(model, [prompt], [word])[0].sum() for word in judge.words)
            assert verdict == bool(yes > no)
            assert judge(PLANETS, answer) == verdict
    shown = tokenizer.decode(judge.prompt(PLANETS, "Answer: Mars"))
    assert "Reference answer: Saturn" in shown and "Answer given: Mars" in shown
    asked = Example(uid="p", question="Which planet has rings?", options=("Mars", "Saturn"), label_style="text", asked=True)
    assert "Reference answer" not in tokenizer.decode(judge.prompt(asked, "Answer: Mars"))


def test_agreement_counts_and_kappa_by_hand():
    from spearfl.tools.judge import agreement

    result = agreement([True, True, True, False, False, False], [True, True, False, False, False, True])
    assert (result.both_right, result.both_wrong, result.judge_only_right, result.oracle_only_right) == (2, 2, 1, 1)
    # observed 4/6; chance 0.5 * 0.5 + 0.5 * 0.5 = 0.5; kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert result.rate == pytest.approx(4 / 6) and result.kappa == pytest.approx(1 / 3)
    assert agreement([True, True], [True, True]).kappa is None  # both always say right: chance agreement is 1


def test_judge_agreement_answers_and_judges_the_held_out_questions(tmp_path):
    from helpers import end_to_end_assets, write_run_config

    from spearfl.data.scoring import is_correct
    from spearfl.runtime.setup import prepare_data
    from spearfl.tools.judge import judge_agreement

    assets = end_to_end_assets()
    config = load_config(write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run"))
    with single_thread():
        result, rows = judge_agreement(config, str(assets.model_dir), 6)
    heldout = prepare_data(config).heldout[:6]
    assert result.total == len(rows) == 6 and [row["uid"] for row in rows] == [e.uid for e in heldout]
    assert [row["oracle"] for row in rows] == [is_correct(e, row["answer"]) for e, row in zip(heldout, rows)]
    assert result.both_right + result.oracle_only_right == sum(row["oracle"] for row in rows)


def test_the_math_provider_judges_latex_answers_by_equivalence():
    """`feedback.provider: math`: a device's own free-form questions judged as MATH is, whatever their answer_format."""
    provider = client_feedback(load_config(None, ["feedback.provider=math", "feedback.hint=solution_steps"]))
    question = Example(uid="d/0", question="What is a half, as a fraction?", answer=r"\frac{1}{2}")
    assert provider(question, "It is one of two equal parts.\nAnswer: 0.5\n").correct
    assert provider(question, r"So the result is \boxed{2/4}.").correct
    wrong = provider(question, "Answer: 0.55\n")
    assert not wrong.correct and wrong.style == "solution_steps"
    assert not verifiers.math_equivalent(question, "no final answer")
