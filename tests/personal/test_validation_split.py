"""TAP's validation split (spearfl.personal.base.ValidationSplit): the loss from a kept layer on is the loss of every
layer, and stage 1's replacement scores each candidate as a full forward would.

In float64 the layered forward and the reference written out here (one row at a time, no padding) differ only in the
order of the same float terms, a difference bounded far below float32 rounding (the argument of
tests/algorithms/test_micro_batches.py); a stale or skipped layer is off by a share of the loss."""

import torch
from helpers import FLOAT32_UNIT_ROUNDOFF, make_config, make_context, tiny_lora_model

from spearfl.lm.models import get_adapter_state, set_adapter_state
from spearfl.personal.base import JudgedAnswer, ValidationSplit, module_groups
from spearfl.personal.tap import replace_modules

TOLERANCE = FLOAT32_UNIT_ROUNDOFF


def float64_model(tokenizer):
    model = tiny_lora_model(tokenizer, seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(2))
    return model.to(torch.float64).eval()


def answers(tokenizer) -> list[JudgedAnswer]:
    """Ten judged answers: two validation forwards (8 rows at most each), prompts and answers of unequal lengths."""
    texts = [(f"Question {i}: which is right{'?' * (i % 3)}", f"Answer: {'ABCD'[i % 4]}{' because' * (i % 2)}\n") for i in range(10)]
    return [JudgedAnswer(tokenizer.encode(q), tokenizer.encode(a, add_special_tokens=False), True) for q, a in texts]


@torch.no_grad()
def loss_written_out(model, items: list[JudgedAnswer]) -> float:
    """Mean negative log-likelihood per answer token, each item alone through the whole model."""
    total, tokens = 0.0, 0
    for item in items:
        ids = torch.tensor([item.prompt + item.completion])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, len(item.prompt) - 1 : -1], dim=-1)
        total -= float(logprobs.gather(-1, ids[0, len(item.prompt) :, None]).sum())
        tokens += len(item.completion)
    return total / tokens


def changed(state, layer: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor + 0.5 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) if f".layers.{layer}." in name else tensor.clone()
            for name, tensor in state.items()}


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_the_loss_from_a_kept_layer_is_the_loss_of_every_layer(tokenizer):
    model = float64_model(tokenizer)
    context, items = make_context(model, tokenizer, make_config()), answers(tokenizer)
    kept = get_adapter_state(model)
    split = ValidationSplit(context, items)
    assert len(split.batches) == 2 and split.layered
    assert relative(split.loss(), loss_written_out(model, items)) <= TOLERANCE

    split.keep_to(1)  # the hidden states entering the second layer, under `kept`
    above = changed(kept, layer=1, seed=0)
    set_adapter_state(model, above)
    assert relative(split.loss(), loss_written_out(model, items)) <= TOLERANCE  # a change from layer 1 on is seen

    below = changed(kept, layer=0, seed=1)
    set_adapter_state(model, below)
    stale, full = split.loss(), loss_written_out(model, items)
    set_adapter_state(model, kept)
    assert relative(stale, loss_written_out(model, items)) <= TOLERANCE  # layer 0 really is skipped: kept's loss
    assert relative(stale, full) > 1000 * TOLERANCE  # which is not the changed adapter's

    split.keep_to(0)  # back below the kept layer: from the embeddings again
    set_adapter_state(model, below)
    assert relative(split.loss(), full) <= TOLERANCE


def scored_as_a_full_forward(monkeypatch, model, items):
    """Every loss stage 1 computes, beside the full forward of the adapter the model holds at that moment."""
    pairs, layered = [], ValidationSplit.loss

    def recording(self):
        got = layered(self)
        pairs.append((got, loss_written_out(model, items)))
        return got

    monkeypatch.setattr(ValidationSplit, "loss", recording)
    return pairs


def replaced_written_out(model, personal, teacher, items) -> list[str]:
    """Stage 1's rule with every loss a full forward: each layer of `teacher` taken, in order, where it lowers it."""
    current, replaced = personal, []
    set_adapter_state(model, current)
    loss = loss_written_out(model, items)
    for module, names in module_groups(current, "layer").items():
        candidate = {name: (teacher if name in names else current)[name] for name in current}
        set_adapter_state(model, candidate)
        candidate_loss = loss_written_out(model, items)
        if candidate_loss < loss:
            current, loss, replaced = candidate, candidate_loss, replaced + [module]
    return replaced


def test_stage_one_scores_every_candidate_as_a_full_forward_would(tokenizer, monkeypatch):
    """Personal and teacher adapters apart in both layers: stage 1 takes what the rule written out with full
    forwards takes, and each of its three losses is the full forward's of the adapter in the model."""
    model = float64_model(tokenizer)
    context, items = make_context(model, tokenizer, make_config()), answers(tokenizer)
    good = get_adapter_state(model)
    personal, teacher = changed(changed(good, 1, seed=3), 0, seed=5), changed(good, layer=0, seed=4)
    expected = replaced_written_out(model, personal, teacher, items)
    pairs = scored_as_a_full_forward(monkeypatch, model, items)
    result, replaced = replace_modules(context, personal, teacher, items, margin=0.0, unit="layer")
    assert replaced == expected and len(pairs) == 3
    taken = {name for module in replaced for name in module_groups(good, "layer")[module]}
    assert all(torch.equal(result[name], (teacher if name in taken else personal)[name]) for name in good)
    assert max(relative(got, full) for got, full in pairs) <= TOLERANCE


def test_the_stage_one_check_catches_hidden_states_kept_under_another_adapter(tokenizer, monkeypatch):
    """The mistake of keeping the hidden states under an adapter other than the one kept so far (a refused
    candidate left in the model, say): the next candidate is scored through the wrong lower layers."""
    model = float64_model(tokenizer)
    context, items = make_context(model, tokenizer, make_config()), answers(tokenizer)
    good = get_adapter_state(model)
    personal, teacher = changed(changed(good, 1, seed=3), 0, seed=5), changed(good, layer=0, seed=4)
    pairs = scored_as_a_full_forward(monkeypatch, model, items)
    keep = ValidationSplit.keep_to

    def keep_under_another(self, layer):
        holding = get_adapter_state(model)
        set_adapter_state(model, good)  # neither the personal adapter's layer 0 nor the teacher's
        keep(self, layer)
        set_adapter_state(model, holding)

    monkeypatch.setattr(ValidationSplit, "keep_to", keep_under_another)
    replace_modules(context, personal, teacher, items, margin=0.0, unit="layer")
    assert max(relative(got, full) for got, full in pairs) > 1000 * TOLERANCE
