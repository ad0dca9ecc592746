from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_float32_close, completion_logprobs, float64_twin
from transformers import GenerationConfig

from spearfl.lm.generation import (
    SamplingSettings,
    choose_tokens,
    generate,
    nucleus,
    sample_by_inversion,
)

PROMPT_END = 7  # the last id of every test prompt; the scripted models react to it


class LookupModel(torch.nn.Module):
    """A stand-in causal LM whose next-token logits depend on the previous token only.

    Rows never interact, so its outputs are exactly the same whatever the batch; it ignores the cache.
    """

    def __init__(self, logits_after, eos_id: int):
        super().__init__()
        self.logits_after = logits_after  # ids [B, T] -> logits [B, T, V]
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.generation_config = GenerationConfig(eos_token_id=eos_id)

    def forward(self, input_ids, logits_to_keep=0, **unused):
        logits = self.logits_after(input_ids)
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:]
        else:
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


def chain_model(tokenizer, chain: list[int]) -> LookupModel:
    """Follows PROMPT_END -> chain[0] -> chain[1] -> ...; any other token repeats itself forever."""
    vocab_size = len(tokenizer)
    following = torch.arange(vocab_size)
    for previous, token in zip([PROMPT_END, *chain], chain, strict=False):
        assert following[previous] == previous, "chain ids must be distinct"
        following[previous] = token

    def logits_after(input_ids):
        logits = torch.full((*input_ids.shape, vocab_size), -20.0)
        return logits.scatter(-1, following[input_ids][..., None], 20.0)

    return LookupModel(logits_after, tokenizer.eos_token_id)


def noise_model(tokenizer, num_tokens: int = 50) -> LookupModel:
    """Random but fixed preferences over the first `num_tokens` ids, keyed by the previous token."""
    table = torch.full((11, len(tokenizer)), -30.0)
    table[:, :num_tokens] = torch.randn(11, num_tokens, generator=torch.Generator().manual_seed(0))
    table[:, :3] = -30.0  # no special tokens, so every completion runs to the limit
    return LookupModel(lambda input_ids: table[input_ids % 11], tokenizer.eos_token_id)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


SAMPLING_FIELDS = {field.name for field in dataclasses.fields(SamplingSettings)}


def run(model, tokenizer, prompts, **overrides):
    """`generate` with greedy defaults; `overrides` name sampling settings or generate's own arguments."""
    settings = dict(max_new_tokens=12, temperature=0.0, top_p=1.0, batch_size=4) | {
        key: value for key, value in overrides.items() if key in SAMPLING_FIELDS
    }
    arguments = {"seed": 0} | {key: value for key, value in overrides.items() if key not in SAMPLING_FIELDS}
    return generate(model, tokenizer, prompts, settings=SamplingSettings(**settings), **arguments)


def test_stops_at_the_end_of_the_answer_line(tokenizer):
    # A newline before the marker does not stop; the one closing the answer line does, and is kept.
    answer_line = encode(tokenizer, "Answer: B\n")
    reasoning = [*encode(tokenizer, "Reasoning first."), *encode(tokenizer, "\n\n")]
    chain = [*reasoning, *answer_line, *encode(tokenizer, "Next")]
    [completion] = run(chain_model(tokenizer, chain), tokenizer, [[1, PROMPT_END]])
    assert completion.text == "Reasoning first.\n\nAnswer: B\n"
    assert completion.token_ids == chain[: -1]
    assert completion.finished_by == "stop"


def test_answer_written_by_the_prompt_counts_for_the_stop(tokenizer):
    chain = encode(tokenizer, " B\nNext line")
    model = chain_model(tokenizer, chain)
    [prefilled] = run(model, tokenizer, [[PROMPT_END]], text_prefix="Answer:")
    assert prefilled.token_ids == chain[:2] and prefilled.finished_by == "stop"
    [plain] = run(model, tokenizer, [[PROMPT_END]], max_new_tokens=5)
    assert plain.finished_by == "length"


def test_without_answer_stop_runs_to_the_limit(tokenizer):
    chain = encode(tokenizer, "Answer: B\nNext line")
    model = chain_model(tokenizer, chain)
    [completion] = run(model, tokenizer, [[PROMPT_END]], stop_after_answer=False, max_new_tokens=9)
    assert completion.finished_by == "length"
    assert len(completion.token_ids) == 9
    assert completion.token_ids[:6] == chain


def test_eos_is_kept_when_emitted(tokenizer):
    chain = [*encode(tokenizer, "Answer: B"), tokenizer.eos_token_id]
    [completion] = run(chain_model(tokenizer, chain), tokenizer, [[PROMPT_END]])
    assert completion.token_ids == chain
    assert completion.finished_by == "eos"
    assert completion.text == "Answer: B"


def test_truncated_completion_gets_no_eos(tokenizer):
    chain = [*encode(tokenizer, "Answer: B"), tokenizer.eos_token_id]
    [completion] = run(chain_model(tokenizer, chain), tokenizer, [[PROMPT_END]], max_new_tokens=2)
    assert completion.token_ids == chain[:2]
    assert completion.finished_by == "length"


def test_generated_ids_are_kept_and_scored_without_retokenising(tokenizer):
    # "Ans" + "wer" and " B" decode to text whose re-encoding differs ("Answer", and "B" once stripped).
    chain = [*encode(tokenizer, "Ans"), *encode(tokenizer, "wer"), *encode(tokenizer, ": B\n")]
    model = chain_model(tokenizer, chain)
    [completion] = run(model, tokenizer, [[PROMPT_END]])
    assert completion.token_ids == chain
    assert encode(tokenizer, completion.text) != chain
    [logprobs] = completion_logprobs(model, [[PROMPT_END]], [completion.token_ids], batch_size=1)
    assert logprobs.shape == (len(chain),)
    assert torch.all(logprobs > -1e-6)  # the scripted model was sure of each id it produced


def test_results_follow_prompt_order_across_batches(tokenizer):
    model = chain_model(tokenizer, [*encode(tokenizer, "Answer: B"), tokenizer.eos_token_id])
    # Each prompt ends with a different id; only PROMPT_END starts the chain, others repeat their last id.
    prompts = [[1, 2, 3, 1000], [PROMPT_END], [5, 1001], [1, 2, 3, 4, 5, 1002]]
    completions = run(model, tokenizer, prompts, batch_size=2, max_new_tokens=3)
    assert [completion.token_ids[0] for completion in completions] == [1000, encode(tokenizer, "Answer")[0], 1001, 1002]
    assert [completion.finished_by for completion in completions] == ["length", "length", "length", "length"]


def test_greedy_decoding_is_deterministic(tiny_model, tokenizer):
    prompts = [[1, 100, 200], [1, 5, 6, 7, 8, 9]]
    first = run(tiny_model, tokenizer, prompts)
    second = run(tiny_model, tokenizer, prompts)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]


def test_sampling_repeats_with_its_seed(tiny_model, tokenizer):
    prompts = [[1, 100, 200], [1, 5, 6, 7, 8, 9]]
    settings = dict(temperature=1.0, top_p=1.0, seed=11)
    first = run(tiny_model, tokenizer, prompts, **settings)
    second = run(tiny_model, tokenizer, prompts, **settings)
    other = run(tiny_model, tokenizer, prompts, **{**settings, "seed": 12})
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_sampling_does_not_depend_on_batch_composition(tokenizer):
    model = noise_model(tokenizer)
    prompts = [[1, 2], [3, 4, 5, 6], [PROMPT_END], [8, 9, 10]]
    settings = dict(temperature=1.0, top_p=0.95, seed=3, max_new_tokens=10)
    together = run(model, tokenizer, prompts, batch_size=4, **settings)
    alone = run(model, tokenizer, prompts, batch_size=1, **settings)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in together}) == len(prompts)


def test_generation_leaves_training_mode_as_it_was(tiny_lora_model, tokenizer):
    tiny_lora_model.train()
    run(tiny_lora_model, tokenizer, [[1, 2, 3]], max_new_tokens=2, progress="testing")
    assert tiny_lora_model.training


def test_top_p_keeps_the_smallest_likely_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    generators = [torch.Generator().manual_seed(index) for index in range(200)]
    settings = SamplingSettings(1, temperature=1.0, top_p=0.7, batch_size=1)
    assert set(choose_tokens(logits, generators, settings).tolist()) == {0, 1}
    settings = SamplingSettings(1, temperature=1.0, top_p=0.1, batch_size=1)
    only_best = choose_tokens(logits, generators, settings)
    assert set(only_best.tolist()) == {0}


def test_inversion_never_draws_a_zero_weight():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0]] * 3)
    uniforms = torch.tensor([0.0, 0.7, 1.0 - 1e-9])
    assert sample_by_inversion(weights, uniforms).tolist() == [1, 3, 3]


def test_bfloat16_model_generates(tiny_model, tokenizer):
    completions = run(tiny_model.to(torch.bfloat16), tokenizer, [[1, 2, 3]], temperature=0.7, max_new_tokens=3)
    assert len(completions[0].token_ids) == 3


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(top_p=0.0), dict(temperature=-1.0)])
def test_rejects_bad_settings(tiny_model, tokenizer, bad):
    with pytest.raises(ValueError):
        run(tiny_model, tokenizer, [[1, 2]], **bad)


@pytest.mark.model
def test_default_model_generates_and_scores_its_own_ids(default_model):
    model, tokenizer = default_model
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
        for text in ("Say hi.", "What is 2 + 2? End with 'Answer: <number>'.")
    ]
    completions = run(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert all(1 <= len(completion.token_ids) <= 6 for completion in completions)
    alone = run(model, tokenizer, prompts[1:], max_new_tokens=6, batch_size=1)
    assert alone[0].token_ids == completions[1].token_ids
    logprobs = completion_logprobs(model, prompts, [c.token_ids for c in completions], batch_size=2)
    assert [len(row) for row in logprobs] == [len(c.token_ids) for c in completions]
    assert all(torch.isfinite(row).all() for row in logprobs)


@pytest.mark.parametrize("peaked", [True, False])
def test_nucleus_from_candidates_equals_the_full_sort(peaked):
    # Peaked rows find their nucleus among the top candidates; flat ones need the whole ordering.
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * (8.0 if peaked else 0.1)
    probabilities = torch.softmax(logits, dim=-1)
    weights, token_ids = nucleus(probabilities, top_p=0.9)
    sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
    in_nucleus = sorted_probabilities.cumsum(-1) - sorted_probabilities < 0.9
    for row in range(3):
        expected = set(order[row][in_nucleus[row]].tolist())
        assert set(token_ids[row][weights[row] > 0].tolist()) == expected


def test_copies_of_a_prompt_run_once_and_each_samples_its_own_stream(tiny_model, tokenizer):
    prompt, other = [1, 100, 200, 300], [1, 5, 6]
    prefill_rows = []
    hook = tiny_model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    try:
        grouped = run(tiny_model, tokenizer, [prompt, other, prompt, prompt], batch_size=4, temperature=1.0, seed=5, max_new_tokens=6)
    finally:
        hook.remove()
    assert prefill_rows == [2]  # one prefill row per distinct prompt
    alone = run(tiny_model, tokenizer, [prompt, other, prompt, prompt], batch_size=1, temperature=1.0, seed=5, max_new_tokens=6)
    assert [c.token_ids for c in grouped] == [c.token_ids for c in alone]
    assert len({tuple(grouped[i].token_ids) for i in (0, 2, 3)}) > 1  # the copies drew different samples


def test_sampled_ids_come_with_their_log_probabilities(tiny_lora_model, tokenizer):
    prompts = [[1, 100, 200], [1, 5, 6, 7, 8, 9], [1, 5, 6, 7, 8, 9]]
    completions = run(tiny_lora_model, tokenizer, prompts, temperature=0.7, top_p=0.9, seed=2, max_new_tokens=5)
    token_ids = [c.token_ids for c in completions]
    scored = completion_logprobs(tiny_lora_model, prompts, token_ids, batch_size=1, temperature=0.7)
    untempered = completion_logprobs(tiny_lora_model, prompts, token_ids, batch_size=1)
    exact = completion_logprobs(float64_twin(tiny_lora_model), prompts, token_ids, batch_size=1, temperature=0.7)
    for completion, row, plain, reference in zip(completions, scored, untempered, exact):
        assert len(completion.logprobs) == len(completion.token_ids)
        # the distribution each id was drawn from: the sampling temperature's, before the nucleus cut
        assert_float32_close(torch.tensor(completion.logprobs), row, reference)
        assert not torch.allclose(torch.tensor(completion.logprobs), plain, atol=1e-3)


def test_a_prompt_extending_an_earlier_one_runs_only_its_new_tokens_and_samples_the_same(tiny_lora_model, tokenizer):
    from spearfl.lm.prefix_cache import PrefixCache

    tasks = [[1, 100, 200, 300, 400], [1, 5, 6, 7]]
    revisions = [tasks[0] + [11, 12, 13], tasks[1] + [21, 22], [1, 100, 200, 55, 56, 57, 58]]  # the last shares 3 tokens
    settings = dict(temperature=1.0, seed=4, max_new_tokens=5)
    plain = run(tiny_lora_model, tokenizer, revisions, **settings)
    prefixes = PrefixCache()
    run(tiny_lora_model, tokenizer, tasks, prefixes=prefixes, **settings)
    assert prefixes.num_tokens == sum(len(task) for task in tasks)
    widths = []
    hook = tiny_lora_model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        reused = run(tiny_lora_model, tokenizer, revisions, prefixes=prefixes, **settings)
    finally:
        hook.remove()
    assert widths[0] == 4  # the new tokens only: the longest row runs 4 of its 7
    assert [c.token_ids for c in reused] == [c.token_ids for c in plain]
    exact = completion_logprobs(float64_twin(tiny_lora_model), revisions, [c.token_ids for c in plain], batch_size=1)
    for left, right, reference in zip(reused, plain, exact):
        assert_float32_close(torch.tensor(left.logprobs), torch.tensor(right.logprobs), reference)


def test_the_prefix_cache_keeps_within_its_bytes_and_a_prompt_it_left_out_runs_whole(tiny_lora_model, tokenizer):
    from spearfl.lm.prefix_cache import PrefixCache

    tasks = [[1, 100, 200, 300, 400], [1, 5, 6, 7]]  # prefilled longest first: the 5-token task is stored first
    revisions = [tasks[0] + [11, 12, 13], tasks[1] + [21, 22]]
    settings = dict(temperature=1.0, seed=4, max_new_tokens=5)
    plain = run(tiny_lora_model, tokenizer, revisions, **settings)
    unbounded = PrefixCache()
    run(tiny_lora_model, tokenizer, tasks, prefixes=unbounded, **settings)
    per_token = unbounded.num_bytes / unbounded.num_tokens
    bounded = PrefixCache(max_bytes=6 * per_token)  # room for the first task's 5 tokens, not for the second's 4 more
    run(tiny_lora_model, tokenizer, tasks, prefixes=bounded, **settings)
    assert list(bounded.entries) == [tuple(tasks[0])] and bounded.num_bytes == 5 * per_token <= bounded.max_bytes
    reused = run(tiny_lora_model, tokenizer, revisions, prefixes=bounded, **settings)
    assert [c.token_ids for c in reused] == [c.token_ids for c in plain]
    exact = completion_logprobs(float64_twin(tiny_lora_model), revisions, [c.token_ids for c in plain], batch_size=1)
    for left, right, reference in zip(reused, plain, exact):
        assert_float32_close(torch.tensor(left.logprobs), torch.tensor(right.logprobs), reference)
    bounded.retain([tasks[1]])  # a prompt never stored: nothing left, and nothing counted
    assert bounded.entries == {} and bounded.num_bytes == 0


def test_rows_that_reuse_alike_share_a_batch(tiny_lora_model, tokenizer):
    from spearfl.lm.generation import batch_order
    from spearfl.lm.prefix_cache import PrefixCache

    task = [1, 100, 200, 300, 400, 500, 600]
    prompts = [task + [11, 12], [1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 9, 9, 9, 9, 9, 9, 9], task + [13]]
    assert batch_order(prompts, None) == [1, 0, 2, 3]  # by length alone: a revision beside a new prompt
    prefixes = PrefixCache()
    run(tiny_lora_model, tokenizer, [task], prefixes=prefixes, temperature=1.0, seed=4, max_new_tokens=2)
    assert batch_order(prompts, prefixes) == [0, 3, 1, 2]  # the two that reuse the task's 7 tokens, then the rest
    plain = run(tiny_lora_model, tokenizer, prompts, temperature=1.0, seed=4, max_new_tokens=5, batch_size=2)
    reused = run(tiny_lora_model, tokenizer, prompts, prefixes=prefixes, temperature=1.0, seed=4, max_new_tokens=5, batch_size=2)
    assert [c.token_ids for c in reused] == [c.token_ids for c in plain]  # results in the prompts' order


def test_a_last_use_drops_the_states_a_batch_copied_and_keeps_the_rest(tiny_lora_model, tokenizer):
    from spearfl.lm.prefix_cache import PrefixCache

    tasks = [[1, 100, 200, 300, 400], [1, 5, 6, 7]]
    prefixes = PrefixCache()
    run(tiny_lora_model, tokenizer, tasks, prefixes=prefixes, temperature=1.0, seed=4, max_new_tokens=2)
    per_token = prefixes.num_bytes / prefixes.num_tokens
    prefixes.retain(tasks)
    prefixes.forget_after_use = True
    run(tiny_lora_model, tokenizer, [tasks[0] + [11, 12]], prefixes=prefixes, temperature=1.0, seed=4, max_new_tokens=2)
    assert list(prefixes.entries) == [tuple(tasks[1])] and prefixes.num_bytes == 4 * per_token
