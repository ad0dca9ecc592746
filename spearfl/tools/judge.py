"""How far an LLM judge agrees with the oracle: the model answers held-out questions, both judge every answer.

The answering model is the run config's (its base model: what a device answers with before training); answers
are greedy, as in evaluation. The oracle's verdict is the dataset's own scoring; the judge's is `Judge`'s.
Reported: agreement, Cohen's kappa (agreement beyond what the two verdict rates give by chance), and the
confusion of the two, so a judge that says "yes" to everything is seen for what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from spearfl.config import RunConfig
from spearfl.data.schema import Example
from spearfl.data.scoring import is_correct
from spearfl.feedback.judge import Judge
from spearfl.lm.generation import SamplingSettings, generate
from spearfl.lm.models import load_base_model
from spearfl.runtime.setup import build_context, prepare_data


@dataclass(frozen=True)
class Agreement:
    """Counts of (oracle, judge) verdict pairs."""

    both_right: int
    both_wrong: int
    judge_only_right: int  # the judge accepted a wrong answer
    oracle_only_right: int  # the judge rejected a right answer

    @property
    def total(self) -> int:
        return self.both_right + self.both_wrong + self.judge_only_right + self.oracle_only_right

    @property
    def rate(self) -> float:
        return (self.both_right + self.both_wrong) / self.total

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa: (observed - chance agreement) / (1 - chance); None when chance agreement is 1."""
        total = self.total
        oracle_yes = (self.both_right + self.oracle_only_right) / total
        judge_yes = (self.both_right + self.judge_only_right) / total
        chance = oracle_yes * judge_yes + (1 - oracle_yes) * (1 - judge_yes)
        return None if chance == 1 else (self.rate - chance) / (1 - chance)


def agreement(oracle: list[bool], judge: list[bool]) -> Agreement:
    """>>> agreement([True, True, False, False], [True, False, True, False]).kappa
    0.0
    """
    pairs = list(zip(oracle, judge))
    return Agreement(
        both_right=pairs.count((True, True)), both_wrong=pairs.count((False, False)),
        judge_only_right=pairs.count((False, True)), oracle_only_right=pairs.count((True, False)),
    )


def judge_agreement(config: RunConfig, judge_model: str, num_questions: int, rubric: str | None = None) -> tuple[Agreement, list[dict]]:
    """Answer `num_questions` held-out questions with the config's model; both verdicts on each answer."""
    examples: list[Example] = prepare_data(config).heldout[:num_questions]
    context = build_context(config)
    settings = SamplingSettings(config.eval.max_new_tokens, 0.0, 1.0, config.eval.batch_size, text_prefix=context.prompts.prefix)
    prompts = [context.prompts.task(example) for example in examples]
    answers = [context.prompts.answer_text(c.text) for c in generate(context.model, context.prompts.tokenizer, prompts, settings, seed=0, progress="answering")]
    model, tokenizer = load_base_model(config.model.model_copy(update={"name": judge_model}))
    judge = Judge(model, tokenizer, rubric, config.prompt.chat_template, batch_size=config.eval.batch_size)
    oracle = [is_correct(example, answer, context.prompts.last_answer) for example, answer in zip(examples, answers)]
    judged = judge.verdicts(examples, answers)
    rows = [{"uid": e.uid, "answer": a, "oracle": o, "judge": j} for e, a, o, j in zip(examples, answers, oracle, judged)]
    return agreement(oracle, judged), rows
