"""The memory plan's parts: log-probs a chunk of the vocabulary at a time, micro-batch rows, the measured activation
costs and the order in which the plan gives up speed for memory."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import assert_float32_close, float64_twin, tiny_lora_model

import spearfl.lm.memory as memory
from spearfl.lm.forward import chunked_distillation, chunked_target_logprobs, token_logprobs
from spearfl.lm.memory import (
    DEFAULT_WORKING_MB,
    MIN_MICRO_BATCH_TOKENS,
    ActivationCosts,
    measure_activation_costs,
    micro_batches,
    plan_step,
    working_memory_mb,
)
from spearfl.lm.training import collate, target_logprobs
from spearfl.losses.distill import token_kl


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_equal_the_whole_softmax_with_their_gradient(chunk, temperature):
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 50, bias=True)
    layer.requires_grad_(False)
    hidden = torch.randn(7, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    upstream = torch.randn(7, generator=generator)

    def whole_softmax(layer, hidden, upstream):
        whole = token_logprobs((layer(hidden) / temperature)[None], targets[None])[0]
        (whole * upstream).sum().backward()
        return whole.detach(), hidden.grad

    whole, expected = whole_softmax(layer, hidden, upstream)
    reference, reference_gradient = whole_softmax(
        copy.deepcopy(layer).double(), hidden.detach().double().requires_grad_(), upstream.double()
    )
    hidden.grad = None
    chunked = chunked_target_logprobs(hidden, layer, targets, temperature, chunk)
    (chunked * upstream).sum().backward()
    assert_float32_close(chunked, whole, reference, "log-probs")
    assert_float32_close(hidden.grad, expected, reference_gradient, "gradient")


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_chunked_distillation_equals_the_whole_softmaxes_with_their_gradient(chunk, temperature):
    """Target log-probs and KL(teacher / T || student / T) a chunk at a time: the whole-vocabulary terms, and the
    gradient of any weighting of them on the student's hidden states, float32 against a float64 reference."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 50, bias=True)
    layer.requires_grad_(False)
    hidden = torch.randn(7, 8, generator=generator, requires_grad=True)
    teacher = 2 * torch.randn(7, 8, generator=generator)
    targets = torch.randint(0, 50, (7,), generator=generator)
    upstream = torch.randn(2, 7, generator=generator)

    def whole_softmaxes(layer, hidden, teacher, upstream):
        student = layer(hidden)
        logprobs = token_logprobs(student[None], targets[None])[0]
        kl = token_kl(torch.log_softmax(layer(teacher) / temperature, -1), torch.log_softmax(student / temperature, -1))
        (logprobs * upstream[0] + kl * upstream[1]).sum().backward()
        return torch.stack([logprobs, kl]).detach(), hidden.grad

    whole, expected = whole_softmaxes(layer, hidden, teacher, upstream)
    reference, reference_gradient = whole_softmaxes(
        copy.deepcopy(layer).double(), hidden.detach().double().requires_grad_(), teacher.double(), upstream.double()
    )
    hidden.grad = None
    chunked = torch.stack(chunked_distillation(hidden, teacher, layer, targets, temperature, chunk))
    (chunked * upstream).sum().backward()
    assert_float32_close(chunked, whole, reference, "log-probs and KL")
    assert_float32_close(hidden.grad, expected, reference_gradient, "gradient")
    double = copy.deepcopy(layer).double()
    assert torch.autograd.gradcheck(
        lambda x: chunked_distillation(x, teacher.double(), double, targets, temperature, 3), (hidden.detach().double().requires_grad_(),)
    )


def test_target_log_probs_in_chunks_match_the_whole_logits_on_the_completion_tokens(tokenizer):
    model = tiny_lora_model(tokenizer)
    batch = collate([[1, 5, 6, 7], [1, 8], [1, 9, 10]], [[20, 21, 22], [23], [24, 25]], 0, torch.device("cpu"))
    whole = target_logprobs(model, batch, 0.8)
    chunked = target_logprobs(model, batch, 0.8, vocabulary_chunk=2)
    reference = target_logprobs(float64_twin(model), batch, 0.8)
    mask = batch.completion_mask
    assert_float32_close(chunked[mask], whole[mask], reference[mask])
    assert torch.all(chunked[~mask] == 0)


def test_a_selection_of_rows_scores_them_as_the_whole_batch_does(tokenizer):
    """Columns that are padding in every selected row go, the targets stay aligned, position ids keep their values."""
    model = tiny_lora_model(tokenizer)
    batch = collate([[1, 5, 6, 7, 8, 9, 10, 11], [1, 8], [1, 9, 10]], [[20, 21, 22], [23], [24, 25]], 0, torch.device("cpu"))
    whole = target_logprobs(model, batch)
    part = batch.select([2, 1])
    assert part.tokens.input_ids.shape[1] < batch.tokens.input_ids.shape[1]  # the long row's padding is gone
    assert part.targets.shape[1] == batch.targets.shape[1] == 3
    selected = target_logprobs(model, part)
    reference = target_logprobs(float64_twin(model), batch)
    mask = part.completion_mask
    assert_float32_close(selected[mask], whole[[2, 1]][mask], reference[[2, 1]][mask])
    short = collate([[1], [1, 2]], [[20, 21, 22], [23]], 0, torch.device("cpu")).select([1])
    assert short.tokens.input_ids.shape[1] >= 4  # never fewer columns than the K + 1 that predict the targets


def test_micro_batches_group_rows_of_like_length_and_keep_a_single_batch_in_order():
    lengths = [30, 10, 25, 11, 40]
    assert micro_batches(lengths, 5) == [[0, 1, 2, 3, 4]]
    assert micro_batches(lengths, 2) == [[1, 3], [2, 0], [4]]
    assert sorted(sum(micro_batches(lengths, 1), [])) == [0, 1, 2, 3, 4]


def test_the_probe_counts_what_a_training_forward_keeps_and_leaves_the_random_stream_alone(tokenizer):
    model = tiny_lora_model(tokenizer, dropout=0.1)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    costs = measure_activation_costs(model)
    assert torch.equal(torch.rand(3), expected_next)
    assert not model.training
    hidden = model.config.hidden_size * 4
    assert costs.boundary_per_token == 2 * hidden  # both layers have LoRA: each keeps its input under checkpointing
    assert costs.layer_per_token > hidden and costs.kept_per_token >= 2 * costs.layer_per_token * 0.9
    assert measure_activation_costs(model) is costs  # measured once per model

    # The per-token figure predicts what a real batch keeps, within a tenth.
    batch = collate([[1] + list(range(100, 140)), [1] + list(range(200, 230))], [[20, 21], [22]], 0, torch.device("cpu"))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    from spearfl.lm.forward import completion_hidden_states

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        completion_hidden_states(model, batch.tokens, 2)
    model.eval()
    tokens = batch.tokens.input_ids.numel()
    assert sum(kept.values()) == pytest.approx(costs.kept_per_token * tokens, rel=0.1)


def test_the_plan_gives_up_speed_for_memory_in_order():
    """Whole batch, then halving micro-batches while they keep enough tokens, then checkpointing down to one row;
    the first that fits wins; none fits: the smallest, marked so."""
    costs = ActivationCosts(kept_per_token=2e6, layer_per_token=7e4, boundary_per_token=7e4, vocabulary=49152, hidden_bytes=2304)
    lengths = [150] * 16
    room = (1e5, 3000, 1300, 650, 320, 100, 50, 1)
    plans = [plan_step(costs, lengths, 16, working) for working in room]
    assert [(plan.micro_batch_rows, plan.checkpoint) for plan in plans] == [
        (16, False), (8, False), (4, False), (2, False), (8, True), (2, True), (1, True), (1, True)
    ]  # one row of 150 tokens is under MIN_MICRO_BATCH_TOKENS: checkpointed 8 rows come before it
    assert all(plan.fits for plan in plans[:-1]) and not plans[-1].fits
    assert all(plan.estimated_mb <= working for plan, working in zip(plans[:-1], room))
    assert all(plan.vocabulary_chunk > 0 for plan in plans)
    # rows too short to fill a matmul: checkpoint before splitting further
    short = plan_step(costs, [40] * 16, 4, 60)
    assert short.checkpoint and short.micro_batch_rows == 4 and 8 * 40 >= MIN_MICRO_BATCH_TOKENS > 4 * 40
    assert plan_step(costs, lengths, 16, 1e5, chunkable=False).vocabulary_chunk == 0
    assert plan_step(costs, lengths, 16, 1e5, force_checkpoint=True).checkpoint


def test_the_working_memory_is_the_budget_less_what_the_process_holds(tokenizer):
    model = tiny_lora_model(tokenizer)
    assert working_memory_mb(None, model, torch.device("cpu")) == DEFAULT_WORKING_MB
    from spearfl.lm.memory import resident_mb

    held = resident_mb()
    room = working_memory_mb(held + 1000, model, torch.device("cpu"))
    assert 900 < room < 1000


@pytest.mark.parametrize("ceiling_mb, expected", [(None, "every"), (0.0, "every"), (1e9, "none")])
def test_checkpointed_layers_hand_memory_back_only_above_the_ceiling(tokenizer, monkeypatch, ceiling_mb, expected):
    """After each checkpointed layer, forward and backward, freed memory goes back while the process holds more than
    the ceiling (no ceiling: always), and never below it."""
    model = tiny_lora_model(tokenizer)
    layers = len(memory.decoder_layers(model))
    calls = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(1))
    monkeypatch.setattr(memory, "CAN_RELEASE", True)  # a C library with malloc_trim, whatever this one has
    batch = collate([[5, 6, 7, 8]], [[9, 10]], 0, torch.device("cpu"))
    model.train()
    with memory.layer_checkpointing(model, True, ceiling_mb):
        target_logprobs(model, batch).sum().backward()
    assert len(calls) == (2 * layers if expected == "every" else 0)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in memory.decoder_layers(model))


def test_a_generation_batch_halves_until_its_final_cache_fits():
    per_token = 46_080  # SmolLM2-135M in float32: 2 x 30 layers x 3 heads x 64 x 4 bytes
    assert memory.generation_rows(16, 94, per_token, 96 * memory.MB) == 16  # 69 MB
    assert memory.generation_rows(16, 160, per_token, 96 * memory.MB) == 8  # 118 MB -> 59 MB
    assert memory.generation_rows(16, 160, per_token, 10 * memory.MB) == 1
    assert memory.generation_rows(16, 10_000, per_token, None) == 16


def test_the_key_value_bytes_per_token_are_what_a_cache_holds(tiny_lora_model):
    from spearfl.lm.forward import prefill

    _, _, cache = prefill(tiny_lora_model, [[1, 2, 3, 4, 5]], torch.device("cpu"))
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert memory.kv_cache_bytes_per_token(tiny_lora_model) * 5 == held


def test_generation_batches_keep_to_the_cache_bound_and_give_the_same_completions(tiny_lora_model, tokenizer, monkeypatch):
    import spearfl.lm.generation as generation

    prompts = [[1 + index, 2, 3, 4, 5, 6, 7, 8][: 3 + index % 5] for index in range(8)]  # 3 to 7 tokens
    settings = generation.SamplingSettings(4, temperature=1.0, top_p=0.9, batch_size=8)
    per_token = memory.kv_cache_bytes_per_token(tiny_lora_model)
    rows_seen = []
    original = generation.generate_batch
    monkeypatch.setattr(
        generation, "generate_batch", lambda model, tok, rows, *rest: rows_seen.append(len(rows)) or original(model, tok, rows, *rest)
    )
    whole = generation.generate(tiny_lora_model, tokenizer, prompts, settings, seed=1)
    bound = 33 * per_token  # 33 tokens: 3 rows of the longest prompt (7) and its 4 new tokens, 4 rows of 4 + 4
    bounded = generation.generate(tiny_lora_model, tokenizer, prompts, dataclasses.replace(settings, cache_bytes=bound), seed=1)
    # longest first: lengths 7, 6 | 5, 5 | 4, 4, 3, 3; each batch halved from 8 rows until rows x (longest + 4) <= 33
    assert rows_seen == [8, 2, 2, 4]
    assert [c.token_ids for c in bounded] == [c.token_ids for c in whole]
