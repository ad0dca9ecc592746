"""Held-out evaluation of an adapter: option log-likelihood and greedy generation, parsed.

The model sees exactly the prompt it sees in training (`PromptFormat.task`): never the facts, solution or
gold answer. `accuracy` is the greedy-generation accuracy (what a user gets); `loglik_accuracy`
picks the option whose "Answer: <label>" line is most likely, which shows knowledge the model has
but may not yet express in its format. The share of each predicted label shows collapse onto one
option, which parsed accuracy alone hides.
"""

from __future__ import annotations

from collections import Counter

from spearfl.data.prompts import PromptFormat
from spearfl.data.schema import Example
from spearfl.data.scoring import is_correct, parse_answer
from spearfl.lm.forward import option_logprobs
from spearfl.lm.generation import SamplingSettings, generate, with_progress
from spearfl.lm.prefix_cache import PrefixCache


def loglik_predictions(
    model, prompt_format: PromptFormat, examples: list[Example], prompts: list[list[int]], batch_size: int, prefixes=None
) -> list[int]:
    """Index of the option whose answer line is most likely, for each multiple-choice example."""
    options = [[prompt_format.option_completion(label) for label in example.labels] for example in examples]
    scores = option_logprobs(model, prompts, options, batch_size=batch_size, prefixes=prefixes)
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def generation_metrics(examples: list[Example], texts: list[str]) -> dict:
    """Accuracy, parse rate and the share of each predicted label among parsed answers."""
    parsed = [parse_answer(example, text) for example, text in zip(examples, texts)]
    correct = [is_correct(example, text) for example, text in zip(examples, texts)]
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
    chunk = EVALUATION_CHUNK_BATCHES * settings.batch_size
    starts = list(range(0, len(examples), chunk))
    predictions: list[int | None] = []
    completions = []
    for start in with_progress(starts, progress, "held-out evaluation"):
        part = examples[start : start + chunk]
        prompts = [prompt_format.task(example) for example in part]
        prefixes = PrefixCache()
        scored = [index for index, example in enumerate(part) if example.is_multiple_choice] if "loglik" in settings.methods else []
        chosen = loglik_predictions(
            model, prompt_format, [part[i] for i in scored], [prompts[i] for i in scored], settings.batch_size, prefixes
        ) if scored else []
        by_index = dict(zip(scored, chosen))
        predictions += [by_index.get(index) for index in range(len(part))]
        if "generate" in settings.methods:
            completions += generate(model, prompt_format.tokenizer, prompts, settings=greedy, seed=0, prefixes=prefixes)
    return {"num_examples": len(examples)} | loglik_metrics(examples, predictions) | completion_metrics(prompt_format, examples, completions)


def loglik_metrics(examples: list[Example], predictions: list[int | None]) -> dict:
    """Option log-likelihood accuracy and the share of each predicted option, over the multiple-choice examples."""
    chosen = [(example, prediction) for example, prediction in zip(examples, predictions) if prediction is not None]
    if not chosen:
        return {}
    keys = share_key_function([example for example, _ in chosen])
    shares = Counter(keys(example, example.labels[prediction]) for example, prediction in chosen)
    return {
        "loglik_accuracy": sum(prediction == example.gold for example, prediction in chosen) / len(chosen),
        "loglik_answer_share": {label: count / len(chosen) for label, count in sorted(shares.items())},
    }


def completion_metrics(prompt_format: PromptFormat, examples: list[Example], completions) -> dict:
    """Metrics of the greedy answers, if any were generated."""
    if not completions:
        return {}
    answers = [prompt_format.answer_text(completion.text) for completion in completions]
    metrics = generation_metrics(examples, answers)
    metrics["mean_completion_tokens"] = sum(len(c.token_ids) for c in completions) / len(completions)
    return metrics
