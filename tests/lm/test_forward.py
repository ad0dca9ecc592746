from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_float32_close, completion_logprobs, float64_twin

from spearfl.lm.forward import (
    at_least_float32,
    batch_for_training,
    completion_token_logits,
    left_pad,
    token_logprobs,
)

PROMPTS = [[1, 50, 60, 70], [1, 9], [1, 300, 301, 302, 303, 304, 305], [4, 4]]
COMPLETIONS = [[80, 2], [10, 11, 12, 13, 14], [306], [5, 6]]


def manual_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """One unpadded full forward, log-softmax everywhere: the definition."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]  # [T, V]
    log_probabilities = torch.log_softmax(at_least_float32(logits), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return log_probabilities[positions, torch.tensor(completion)]


def test_token_logprobs_picks_the_target_log_softmax():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]])  # [1, 2, 2]
    targets = torch.tensor([[1, 1]])
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([ln 4, 0]) = [4/5, 1/5]
    expected = torch.tensor([[math.log(3 / 4), math.log(1 / 5)]])
    assert torch.allclose(token_logprobs(logits, targets), expected)
    assert token_logprobs(logits.to(torch.bfloat16), targets).dtype == torch.float32


def test_left_pad_aligns_sequences_on_the_right():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_training_batch_targets_are_exactly_the_completion_ids():
    batch = batch_for_training(PROMPTS, COMPLETIONS, pad_id=0)
    length = max(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS))
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.completion_mask.shape == (4, length)
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        assert batch.input_ids[row][batch.completion_mask[row]].tolist() == completion
        assert batch.input_ids[row][batch.attention_mask[row].bool()].tolist() == prompt + completion
        real_positions = batch.position_ids[row][batch.attention_mask[row].bool()]
        assert real_positions.tolist() == list(range(len(prompt) + len(completion)))
    assert batch.completion_mask[:, -1].all()  # left padding: every completion ends in the last column


def test_empty_completion_is_rejected():
    with pytest.raises(ValueError):
        batch_for_training([[1, 2]], [[]], pad_id=0)


def test_completion_token_logits_line_up_with_targets(tiny_model):
    batch = batch_for_training(PROMPTS, COMPLETIONS, pad_id=0)
    with torch.no_grad():
        logits = completion_token_logits(tiny_model, batch)
    num_positions = max(len(c) for c in COMPLETIONS)
    assert logits.shape == (4, num_positions, tiny_model.config.vocab_size)
    row = 1  # the longest completion fills all K positions
    expected = manual_logprobs(tiny_model, PROMPTS[row], COMPLETIONS[row])
    targets = batch.input_ids[row, -num_positions:]
    observed = torch.log_softmax(logits[row], -1).gather(-1, targets[:, None]).squeeze(-1)
    assert_float32_close(observed, expected, manual_logprobs(float64_twin(tiny_model), PROMPTS[row], COMPLETIONS[row]))


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_logprobs_match_a_manual_full_forward(tiny_model, batch_size):
    observed = completion_logprobs(tiny_model, PROMPTS, COMPLETIONS, batch_size=batch_size)
    twin = float64_twin(tiny_model)
    for prompt, completion, row in zip(PROMPTS, COMPLETIONS, observed):
        assert row.dtype == torch.float32 and row.device.type == "cpu"
        expected = manual_logprobs(tiny_model, prompt, completion)
        assert_float32_close(row, expected, manual_logprobs(twin, prompt, completion))


def test_logprobs_through_lora_match_the_base_at_initialisation(tiny_model, tiny_lora_model):
    # LoRA's B starts at zero, so the wrapped model computes the base function.
    base = completion_logprobs(tiny_model, PROMPTS, COMPLETIONS, batch_size=4)
    wrapped = completion_logprobs(tiny_lora_model, PROMPTS, COMPLETIONS, batch_size=4)
    for expected, observed in zip(base, wrapped):
        torch.testing.assert_close(observed, expected)


def test_bfloat16_model_gives_float32_logprobs(tiny_model):
    model = tiny_model.to(torch.bfloat16)
    rows = completion_logprobs(model, PROMPTS, COMPLETIONS, batch_size=4)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(row.dtype == torch.float32 for row in rows)


def test_option_logprobs_with_a_shared_prompt_cache_match_full_sequences(tokenizer, tiny_model):
    from spearfl.lm.forward import option_logprobs

    prompts = [tokenizer.encode("Which is a fruit?"), tokenizer.encode("Sky colour, in one word, please?")]
    options = [
        [tokenizer.encode(" Answer: apple", add_special_tokens=False), tokenizer.encode(" Answer: a big stone", add_special_tokens=False)],
        [tokenizer.encode(" Answer: blue", add_special_tokens=False), tokenizer.encode(" Answer: red", add_special_tokens=False),
         tokenizer.encode(" Answer: green grass", add_special_tokens=False)],
    ]
    cached = option_logprobs(tiny_model, prompts, options, batch_size=2)
    twin = float64_twin(tiny_model)
    for prompt, choices, scores in zip(prompts, options, cached):
        expected, reference = (
            [float(row.sum()) for row in completion_logprobs(model, [prompt] * len(choices), choices, batch_size=1)]
            for model in (tiny_model, twin)
        )
        assert_float32_close(scores, expected, reference)


def test_option_scores_with_line_ends_add_the_mass_of_ending_the_line_there(tokenizer, tiny_model):
    """An option that is only the beginning of a likelier one ("cat" of "catfish") must not collect its mass."""
    from spearfl.lm.forward import option_logprobs

    prompt = tokenizer.encode("Which animal lives in rivers?")
    options = [tokenizer.encode(" Answer: cat", add_special_tokens=False), tokenizer.encode(" Answer: catfish", add_special_tokens=False)]
    end_ids = [tokenizer.eos_token_id, *tokenizer.encode("\n", add_special_tokens=False)]
    scores, = option_logprobs(tiny_model, [prompt], [options], batch_size=2, end_ids=end_ids)

    def by_definition(model, choice):
        with torch.no_grad():
            logits = at_least_float32(model(input_ids=torch.tensor([prompt + choice])).logits[0])  # [T, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        body = sum(float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(choice))
        return body + float(torch.logsumexp(logprobs[-1, end_ids], dim=0))

    twin = float64_twin(tiny_model)
    for choice, score in zip(options, scores):
        assert_float32_close(score, by_definition(tiny_model, choice), by_definition(twin, choice))


SYSTEM = list(range(300, 312))  # 12 tokens every prompt begins with, like a chat model's system turn


@pytest.mark.parametrize(
    "prompts, completions",
    [
        ([SYSTEM + [5, 6, 7], SYSTEM + [8], SYSTEM + [9, 10, 11, 12, 13]], [[20, 21], [22, 23, 24, 25], [26]]),
        ([SYSTEM + [5], SYSTEM + [5]], [[20, 21, 22], [23]]),  # one prompt twice: the shared part stops before its last token
    ],
)
def test_a_shared_beginning_runs_once_with_the_same_logits_and_gradients(tokenizer, monkeypatch, prompts, completions):
    from helpers import tiny_lora_model as build

    import spearfl.lm.forward as scoring_lm

    tiny_lora_model = build(tokenizer, dropout=0.0)
    with torch.no_grad():
        for name, parameter in tiny_lora_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(1))  # B = 0 would hide the A gradients

    batch = batch_for_training(prompts, completions, 0)
    assert scoring_lm.shared_prefix_length(batch) == (12 if prompts[0] != prompts[1] else len(prompts[0]) - 1)
    tiny_lora_model.train()
    widths = []
    hook = scoring_lm.decoder(tiny_lora_model).register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True
    )

    twin = float64_twin(tiny_lora_model)

    def logits_and_gradients(model):
        torch.manual_seed(0)
        logits = completion_token_logits(model, batch)
        (at_least_float32(logits).logsumexp(-1) * batch.completion_mask[:, -logits.shape[1]:]).sum().backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return logits.detach(), gradients

    shared_logits, shared_gradients = logits_and_gradients(tiny_lora_model)
    hook.remove()
    assert widths[0][0] == 1  # the shared beginning ran as one row
    monkeypatch.setattr(scoring_lm, "MIN_SHARED_PREFIX", 10**6)
    plain_logits, plain_gradients = logits_and_gradients(tiny_lora_model)
    reference_logits, reference_gradients = logits_and_gradients(twin)
    mask = batch.completion_mask[:, -plain_logits.shape[1]:]
    assert_float32_close(shared_logits[mask], plain_logits[mask], reference_logits[mask], "logits")
    assert shared_gradients.keys() == plain_gradients.keys() == reference_gradients.keys()
    for name in plain_gradients:
        assert_float32_close(shared_gradients[name], plain_gradients[name], reference_gradients[name], name)


def test_a_prefill_runs_a_shared_beginning_once_with_the_same_results(tiny_model, monkeypatch):
    import spearfl.lm.forward as scoring_lm
    from spearfl.lm.generation import decode_step

    prompts = [SYSTEM + [5, 6, 7], SYSTEM + [8], SYSTEM + [9, 10, 11, 12, 13]]
    device = torch.device("cpu")

    next_tokens = None  # the plain float32 run's picks, fed to every run so that all decode the same step

    def prefill_then_step(model):
        with torch.no_grad():
            mask, logits, cache = scoring_lm.prefill(model, prompts, device)
            picked = logits.argmax(-1) if next_tokens is None else next_tokens
            _, next_logits = decode_step(model, picked, mask, cache)
        return logits, next_logits

    shared = prefill_then_step(tiny_model)
    monkeypatch.setattr(scoring_lm, "MIN_SHARED_PREFIX", 10**6)
    plain = prefill_then_step(tiny_model)
    next_tokens = plain[0].argmax(-1)
    assert torch.equal(shared[0].argmax(-1), next_tokens)
    reference = prefill_then_step(float64_twin(tiny_model))
    for got, expected, exact in zip(shared, plain, reference):
        assert_float32_close(got, expected, exact)
