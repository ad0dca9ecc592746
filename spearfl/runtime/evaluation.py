"""Held-out evaluation of an adapter: option scoring in two formats, and greedy generation, parsed.

The model sees exactly the prompt it sees in training (`PromptFormat.task`): never the facts, solution or
gold answer. Metrics, each over the held-out examples (multiple choice only for the option scores):
- `accuracy`: greedy generation, parsed (what a user gets); `parse_rate`; `answer_share` per label.
- `loglik_accuracy`: the option whose answer line ("Answer: <label>" and the line's end) is most likely
  after the task prompt, which lists the options; `loglik_norm_accuracy` the same with each score divided
  by the characters of its line (lm-eval-harness's acc_norm), so long labels are not penalised for their
  length. These show what the model would answer in the asked format, without the format's noise.
- `cloze_accuracy`: ranked classification, the format of published zero-shot figures (OLMES, lm-eval-harness):
  the bare question, no options listed, no instruction, no chat template, each option's text scored as its
  continuation; `cloze_norm_accuracy` per character of the continuation. This shows what the model knows.
The share of each predicted label shows collapse onto one option, which parsed accuracy alone hides.
A backdoor's reach (`trigger_metrics`, when the run has a trigger to probe): `trigger_rate` (greedy answers)
and `trigger_loglik_rate` (option log-likelihood), the shares of triggered held-out questions answered with the
target option, over the `trigger_examples` questions whose own answer is another option.
"""

from __future__ import annotations

from collections import Counter

from spearfl.data.prompts import PromptFormat
from spearfl.data.schema import Example
from spearfl.data.scoring import is_correct, parse_answer
from spearfl.feedback.poison import target_index, triggered
from spearfl.lm.forward import option_logprobs
from spearfl.lm.generation import SamplingSettings, generate, line_end_ids, with_progress
from spearfl.lm.prefix_cache import PrefixCache


def best_options(scores: list[list[float]], lengths: list[list[int]] | None = None) -> list[int]:
    """Index of the highest score in each row; divided by `lengths` (characters) first when given.

    >>> best_options([[-3.0, -4.0]]), best_options([[-3.0, -4.0]], [[1, 4]])
    ([0], [1])
    """
    if lengths is not None:
        scores = [[score / length for score, length in zip(row, row_lengths)] for row, row_lengths in zip(scores, lengths)]
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def loglik_predictions(
    model, prompt_format: PromptFormat, examples: list[Example], prompts: list[list[int]], batch_size: int,
    prefixes=None, end_ids=None,
) -> dict[str, list[int]]:
    """Per multiple-choice example, the option whose answer line is most likely: by its total log-probability
    ("loglik") and per character of the line ("loglik_norm")."""
    lines = [[prompt_format.option_line(label) for label in example.labels] for example in examples]
    options = [[prompt_format.tokenizer.encode(line, add_special_tokens=False) for line in row] for row in lines]
    scores = option_logprobs(model, prompts, options, batch_size=batch_size, prefixes=prefixes, end_ids=end_ids)
    lengths = [[len(line) for line in row] for row in lines]
    return {"loglik": best_options(scores), "loglik_norm": best_options(scores, lengths)}


def cloze_predictions(model, prompt_format: PromptFormat, examples: list[Example], batch_size: int) -> dict[str, list[int]]:
    """Per multiple-choice example, the option whose text best continues the bare question: by total
    log-probability ("cloze") and per character of the continuation ("cloze_norm")."""
    items = [prompt_format.cloze(example) for example in examples]
    scores = option_logprobs(model, [context for context, _, _ in items], [ids for _, _, ids in items], batch_size=batch_size)
    lengths = [[len(text) for text in texts] for _, texts, _ in items]
    return {"cloze": best_options(scores), "cloze_norm": best_options(scores, lengths)}


def generation_metrics(examples: list[Example], texts: list[str], last_answer: bool = False) -> dict:
    """Accuracy, parse rate and the share of each predicted label among parsed answers.
    last_answer: the last declared answer of each text counts (chain of thought), not the first."""
    parsed = [parse_answer(example, text, last_answer) for example, text in zip(examples, texts)]
    correct = [is_correct(example, text, last_answer) for example, text in zip(examples, texts)]
    metrics = {
        "accuracy": sum(correct) / len(examples),
        "parse_rate": sum(answer is not None for answer in parsed) / len(examples),
    }
    multiple_choice = [(example, answer) for example, answer in zip(examples, parsed) if example.is_multiple_choice]
    if multiple_choice:
        keys = share_key_function([example for example, _ in multiple_choice])
        counts = Counter(keys(example, answer) for example, answer in multiple_choice if answer is not None)
        num_answers = sum(counts.values())
        metrics["answer_share"] = {key: count / max(num_answers, 1) for key, count in sorted(counts.items())}
    return metrics


def share_key_function(examples: list[Example]):
    """How predictions are grouped in answer shares: by label, or by option position when option texts
    serve as labels and change from question to question (shares of single texts would say nothing)."""
    varied_text = any(e.label_style == "text" for e in examples) and len({e.options for e in examples}) > 1
    if varied_text:
        return lambda example, label: f"option {example.labels.index(label) + 1}"
    return lambda example, label: label


EVALUATION_CHUNK_BATCHES = 4  # batches scored, then generated, at a time: their prompt states are kept in between


def evaluate(model, prompt_format: PromptFormat, examples: list[Example], settings, progress=False) -> dict:
    """Held-out metrics for the model's current adapter.  settings: spearfl.config.EvalConfig.

    Examples go in chunks; within one, generation reuses the prompt states of the option scoring, so each
    prompt runs once. progress: False, True, or a live rich Progress to show a bar over the chunks on.
    """
    model.eval()
    greedy = SamplingSettings(settings.max_new_tokens, 0.0, 1.0, settings.batch_size, text_prefix=prompt_format.prefix)
    end_ids = line_end_ids(model, prompt_format.tokenizer) if "loglik" in settings.methods else None
    chunk = EVALUATION_CHUNK_BATCHES * settings.batch_size
    predictions: dict[str, dict[str, int]] = {}  # metric name -> example uid -> chosen option
    completions = []
    for start in with_progress(list(range(0, len(examples), chunk)), progress, "held-out evaluation"):
        part = examples[start : start + chunk]
        prompts = [prompt_format.task(example) for example in part]
        prefixes = PrefixCache()
        scored = [index for index, example in enumerate(part) if example.is_multiple_choice]
        if scored and "loglik" in settings.methods:
            chosen = loglik_predictions(
                model, prompt_format, [part[i] for i in scored], [prompts[i] for i in scored], settings.batch_size,
                prefixes, end_ids,
            )
            record_predictions(predictions, [part[i] for i in scored], chosen)
        if scored and "cloze" in settings.methods:
            record_predictions(predictions, [part[i] for i in scored], cloze_predictions(model, prompt_format, [part[i] for i in scored], settings.batch_size))
        if "generate" in settings.methods:
            completions += generate(model, prompt_format.tokenizer, prompts, settings=greedy, seed=0, prefixes=prefixes)
    metrics = {"num_examples": len(examples)}
    for name, chosen in predictions.items():
        metrics |= option_metrics(name, examples, chosen, with_share=name == "loglik")
    return metrics | completion_metrics(prompt_format, examples, completions)


def record_predictions(predictions: dict[str, dict[str, int]], examples: list[Example], chosen: dict[str, list[int]]) -> None:
    for name, indices in chosen.items():
        predictions.setdefault(name, {}).update((example.uid, index) for example, index in zip(examples, indices))


def option_metrics(name: str, examples: list[Example], chosen: dict[str, int], with_share: bool = False) -> dict:
    """`<name>_accuracy` over the multiple-choice examples, and with `with_share` the share of each predicted option."""
    scored = [(example, chosen[example.uid]) for example in examples if example.uid in chosen]
    if not scored:
        return {}
    metrics = {f"{name}_accuracy": sum(index == example.gold for example, index in scored) / len(scored)}
    if with_share:
        keys = share_key_function([example for example, _ in scored])
        shares = Counter(keys(example, example.labels[index]) for example, index in scored)
        metrics[f"{name}_answer_share"] = {label: count / len(scored) for label, count in sorted(shares.items())}
    return metrics


def completion_metrics(prompt_format: PromptFormat, examples: list[Example], completions) -> dict:
    """Metrics of the greedy answers, if any were generated."""
    if not completions:
        return {}
    answers = [prompt_format.answer_text(completion.text) for completion in completions]
    metrics = generation_metrics(examples, answers, prompt_format.last_answer)
    metrics["mean_completion_tokens"] = sum(len(c.token_ids) for c in completions) / len(completions)
    return metrics


def trigger_metrics(model, prompt_format: PromptFormat, examples: list[Example], trigger: str, target: int, settings) -> dict:
    """How often the trigger phrase draws the target option: the multiple-choice examples whose gold is another
    option, with the trigger appended and the target as their gold, evaluated as the held-out set is (option
    log-likelihood and greedy answers, as `settings.methods` asks; cloze is left out: it lists no options)."""
    probes = [
        triggered(example, trigger, target)
        for example in examples
        if example.is_multiple_choice and example.gold != target_index(example, target)
    ]
    methods = [method for method in settings.methods if method in ("loglik", "generate")]
    if not probes or not methods:
        return {}
    scored = evaluate(model, prompt_format, probes, settings.model_copy(update={"methods": methods}))
    metrics = {"trigger_examples": len(probes)}
    if "loglik_accuracy" in scored:
        metrics["trigger_loglik_rate"] = scored["loglik_accuracy"]
    if "accuracy" in scored:
        metrics["trigger_rate"] = scored["accuracy"]
    return metrics
