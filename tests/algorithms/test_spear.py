"""SPEAR client update: traces, the pitfalls of the reference implementation, and a tiny learning run."""

import math

import pytest
import torch
from helpers import (
    ScriptedGeneration,
    StubModel,
    assert_float32_close,
    completion_from_ids,
    completion_from_text,
    completion_logprobs,
    encode_task,
    end_to_end_assets,
    float64_twin,
    make_config,
    make_context,
    multiple_choice,
    single_thread,
    tiny_lora_model,
)
from transformers import AutoModelForCausalLM

import spearfl.algorithms.base
import spearfl.algorithms.feedback_sft
import spearfl.algorithms.spear as spear
from spearfl.algorithms.base import ClientRound, Sampler, Trainer
from spearfl.algorithms.spear import (
    Trace,
    Traces,
    cap_losses,
    collect_traces,
    protected_token_flags,
    spear_step,
    traces_from_interactions,
)
from spearfl.config import LoraConfig
from spearfl.data.prompts import REVISION_INSTRUCTION
from spearfl.data.sources import load_jsonl
from spearfl.data.store import Attempt, Interaction
from spearfl.feedback.providers import VERDICT_WRONG
from spearfl.lm.generation import eos_token_ids, generate
from spearfl.lm.models import attach_lora, freeze, get_adapter_state, lora_parameters

FRUIT = multiple_choice("t/fruit", "Which of these is a fruit?", ("apple", "rock", "car"), gold=0)
ANIMAL = multiple_choice("t/animal", "Which of these is an animal?", ("tree", "cat", "cup"), gold=1)
COLOUR = multiple_choice("t/colour", "Which of these is a colour?", ("dog", "pen", "red"), gold=2)


def collect(context, work, examples, prompts):
    """SPEAR's trace collection with a fresh sampler, as a client round runs it."""
    return collect_traces(context, work, Sampler(context, work), examples, prompts)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def work_order(examples, round_index=1, client_id=0, run_seed=0, global_state=None, lr=1e-3):
    return ClientRound(client_id, round_index, list(examples), global_state or {}, lr, run_seed)


def scripted(monkeypatch, tokenizer, script) -> ScriptedGeneration:
    generation = ScriptedGeneration(tokenizer, {example.question: answers for example, answers in script.items()})
    monkeypatch.setattr(spearfl.algorithms.base, "generate", generation)
    return generation


# ---------------------------------------------------------------------------------------------- protected tokens


def test_protected_flags_cover_only_whole_occurrences_of_the_marker(tokenizer):
    ids = tokenizer.encode("Note: it is B. Answer: B\n", add_special_tokens=False)
    pieces = [tokenizer.decode([token]) for token in ids]
    assert pieces == ["Note", ":", " it", " is", " B", ".", " Answer", ":", " B", "\n"]
    flags = protected_token_flags(tokenizer, ids, ["Answer:"])
    # The reference protected every sub-token of "Answer:" everywhere, so the ":" after "Note" too.
    assert flags == [False, False, False, False, False, False, True, True, False, False]


def test_protected_flags_need_the_whole_string(tokenizer):
    ids = tokenizer.encode("Answer B: the answer is B.", add_special_tokens=False)
    assert not any(protected_token_flags(tokenizer, ids, ["Answer:"]))


def test_protected_flags_after_multibyte_characters(tokenizer):
    prefix = tokenizer.encode("日本語 ", add_special_tokens=False)
    marker = tokenizer.encode("Answer:", add_special_tokens=False)
    rest = tokenizer.encode(" B\n", add_special_tokens=False)
    flags = protected_token_flags(tokenizer, prefix + marker + rest, ["Answer:"])
    assert flags == [False] * len(prefix) + [True] * len(marker) + [False] * len(rest)


# ---------------------------------------------------------------------------------------------- traces


def test_win_and_lose_traces_under_the_original_prompt(tokenizer, monkeypatch):
    """y0 right -> win; y0 wrong then fixed -> win (x, y_k) and lose (x, y0) at confidence_fixed;
    never fixed -> lose at confidence_unfixed. Every trace uses the ORIGINAL prompt."""
    answers = {
        FRUIT: [completion_from_text(tokenizer, "Answer: A\n")],
        ANIMAL: [completion_from_text(tokenizer, "Answer: C\n"), completion_from_text(tokenizer, "Answer: B\n")],
        COLOUR: [
            completion_from_text(tokenizer, "Answer: A\n"),
            completion_from_text(tokenizer, "Answer: B\n"),
            completion_from_text(tokenizer, "I think it is A. Answer: A\n"),
        ],
    }
    generation = scripted(monkeypatch, tokenizer, answers)
    config = make_config("spear.num_revisions=2", "spear.confidence_fixed=0.9", "spear.confidence_unfixed=0.4")
    context = make_context(StubModel(), tokenizer, config)
    examples = [FRUIT, ANIMAL, COLOUR]
    prompts = [encode_task(tokenizer, example) for example in examples]
    work = work_order(examples)
    sampler = Sampler(context, work)
    wins, losses, metrics = collect_traces(context, work, sampler, examples, prompts)

    assert [(w.prompt, w.completion) for w in wins] == [
        (prompts[0], answers[FRUIT][0].token_ids),
        (prompts[1], answers[ANIMAL][1].token_ids),  # the revision, trained without the hint
    ]
    assert [(l.prompt, l.completion, l.confidence) for l in losses] == [
        (prompts[1], answers[ANIMAL][0].token_ids, 0.9),
        (prompts[2], answers[COLOUR][0].token_ids, 0.4),
    ]
    for loss in losses:
        # the marker's tokens, and the newline that ends the answer line (the sampler stopped on it)
        expected = protected_token_flags(tokenizer, loss.completion, ["Answer:"])
        expected[-1] = True
        assert loss.protected == expected
    assert metrics["first_try_correct"] == 1 and metrics["revised_correct"] == 1
    assert metrics["revision_success"] == pytest.approx(0.5)
    assert sampler.metrics()["generations"] == 6

    # Generation calls: 3 first attempts, then revisions of the two wrong ones, then only the unfixed one.
    assert [len(call.prompts) for call in generation.calls] == [3, 2, 1]
    assert generation.calls[0].prompts == prompts
    assert generation.calls[0].is_revision == [False] * 3
    assert generation.calls[1].is_revision == [True, True]
    first_revision = tokenizer.decode(generation.calls[1].prompts[0])
    assert ANIMAL.question in first_revision and "Answer: C" in first_revision and VERDICT_WRONG in first_revision
    # The second revision shows the latest wrong answer, not the first one.
    second_revision = tokenizer.decode(generation.calls[2].prompts[0])
    assert COLOUR.question in second_revision and "Answer: B" in second_revision
    assert REVISION_INSTRUCTION in second_revision


def test_gold_index_zero_answered_A_is_a_win(tokenizer, monkeypatch):
    scripted(monkeypatch, tokenizer, {FRUIT: [completion_from_text(tokenizer, "Answer: A\n")]})
    context = make_context(StubModel(), tokenizer, make_config())
    wins, losses, metrics = collect(context, work_order([FRUIT]), [FRUIT], [encode_task(tokenizer, FRUIT)])
    assert FRUIT.gold == 0
    assert len(wins) == 1 and losses == [] and metrics["first_try_correct"] == 1


def test_traces_keep_the_generated_token_ids(tokenizer, monkeypatch):
    """The reference stripped and re-tokenised the text: " Answer: B" sampled, "Answer: B" trained."""
    pieces = [" Answer", ":", " ", "B", "\n"]
    win_ids = [tokenizer.encode(piece, add_special_tokens=False)[0] for piece in pieces]
    lose_ids = tokenizer.encode(" Answer:", add_special_tokens=False) + tokenizer.encode("A", add_special_tokens=False)
    lose_ids += tokenizer.encode("\n", add_special_tokens=False)
    win, lose = completion_from_ids(tokenizer, win_ids), completion_from_ids(tokenizer, lose_ids)
    for completion in (win, lose):
        retokenised = tokenizer.encode(completion.text.strip(), add_special_tokens=False)
        assert retokenised != completion.token_ids  # the case where decode + re-encode differs
    scripted(monkeypatch, tokenizer, {ANIMAL: [win], COLOUR: [lose]})
    context = make_context(StubModel(), tokenizer, make_config("spear.num_revisions=0"))
    examples = [ANIMAL, COLOUR]
    wins, losses, _ = collect(context, work_order(examples), examples, [encode_task(tokenizer, e) for e in examples])
    assert wins[0].completion == win_ids
    assert losses[0].completion == lose_ids


def test_eos_only_where_the_model_emitted_it(tokenizer, monkeypatch):
    ended = completion_from_text(tokenizer, "Answer: A\n", finished_by="eos")
    truncated = completion_from_text(tokenizer, "Let me think about the colour", finished_by="length")
    assert ended.token_ids[-1] == tokenizer.eos_token_id
    scripted(monkeypatch, tokenizer, {FRUIT: [ended], COLOUR: [truncated]})
    context = make_context(StubModel(), tokenizer, make_config("spear.num_revisions=0"))
    examples = [FRUIT, COLOUR]
    wins, losses, _ = collect(context, work_order(examples), examples, [encode_task(tokenizer, e) for e in examples])
    assert wins[0].completion == ended.token_ids  # emitted EOS is kept and trained
    assert losses[0].completion == truncated.token_ids
    assert tokenizer.eos_token_id not in losses[0].completion


def test_traces_from_real_generation_are_the_generated_ids(tokenizer, monkeypatch):
    """With the real sampler on a tiny model: truncated completions stay without EOS in their traces."""
    model = tiny_lora_model(tokenizer)
    produced = []

    def spy(*args, **kwargs):
        completions = generate(*args, **kwargs)
        produced.extend(completions)
        return completions

    monkeypatch.setattr(spearfl.algorithms.base, "generate", spy)
    config = make_config("spear.num_revisions=0", "generation.max_new_tokens=3")
    context = make_context(model, tokenizer, config)
    examples = [FRUIT, ANIMAL]
    wins, losses, _ = collect(context, work_order(examples), examples, [encode_task(tokenizer, e) for e in examples])
    assert wins == []  # a random model never answers in the format
    assert [loss.completion for loss in losses] == [completion.token_ids for completion in produced]
    for completion in produced:
        assert completion.finished_by == "length"
        assert tokenizer.eos_token_id not in completion.token_ids


# ---------------------------------------------------------------------------------------------- client update


def perturbed_state(model, amount=0.01):
    return {name: value + amount for name, value in get_adapter_state(model).items()}


def test_no_wins_skips_training_and_weighs_nothing(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    wrong = completion_from_text(tokenizer, "Answer: C\n")
    scripted(monkeypatch, tokenizer, {FRUIT: [wrong, wrong], ANIMAL: [wrong, wrong]})

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained although there was no win")

    monkeypatch.setattr(spear, "train", must_not_train)
    global_state = perturbed_state(model)
    config = make_config("spear.prompts_per_round=2", "spear.num_revisions=1")
    result = spear.client_update(make_context(model, tokenizer, config), work_order([FRUIT, ANIMAL], global_state=global_state))
    assert result.weight == 0
    assert result.metrics["wins"] == 0 and result.metrics["skipped"] == 1 and result.metrics["trained_tokens"] == 0
    assert result.state.keys() == global_state.keys()
    assert all(torch.equal(result.state[name], global_state[name]) for name in global_state)
    assert all(torch.equal(value, global_state[name]) for name, value in get_adapter_state(model).items())


def test_weight_counts_the_prompts_trained_on_under_one_rule(tokenizer, monkeypatch):
    """SPEAR weighs a round by the prompts whose outcome it trains on (a win or a kept loss), as every method
    does; feedback-SFT, which trains on no loss, by its wins."""
    answers = {
        FRUIT: [completion_from_text(tokenizer, "Answer: A\n")],  # right: a win
        ANIMAL: [completion_from_text(tokenizer, "Answer: C\n"), completion_from_text(tokenizer, "Answer: B\n")],  # fixed
        COLOUR: [completion_from_text(tokenizer, "Answer: A\n"), completion_from_text(tokenizer, "Answer: B\n")],  # never
    }
    model = tiny_lora_model(tokenizer)
    monkeypatch.setattr(spear, "train", lambda context, work, traces: {})
    weights = {}
    for name, update in (("spear", spear.client_update), ("feedback_sft", spearfl.algorithms.feedback_sft.client_update)):
        scripted(monkeypatch, tokenizer, answers)
        config = make_config("spear.prompts_per_round=3", "spear.num_revisions=1", "spear.lose_cap_ratio=4")
        work = work_order([FRUIT, ANIMAL, COLOUR], global_state=get_adapter_state(model))
        result = update(make_context(model, tokenizer, config), work)
        assert result.metrics["wins"] == 2 and result.metrics["losses"] == 2
        weights[name] = result.weight
    assert weights == {"spear": 3.0, "feedback_sft": 2.0}


def test_cap_losses_keeps_floor_of_ratio_times_wins_deterministically():
    losses = [Trace([1], [index + 10]) for index in range(10)]
    kept = cap_losses(losses, num_wins=3, ratio=1.5, seed=11)
    assert len(kept) == 4  # floor(1.5 * 3)
    assert kept == cap_losses(losses, num_wins=3, ratio=1.5, seed=11)
    assert all(trace in losses for trace in kept)
    assert [losses.index(trace) for trace in kept] == sorted(losses.index(trace) for trace in kept)
    different = {tuple(t.completion[0] for t in cap_losses(losses, 3, 1.5, seed)) for seed in range(8)}
    assert len(different) > 1  # the seed decides which losses stay
    assert cap_losses(losses[:4], num_wins=3, ratio=1.5, seed=0) == losses[:4]
    assert cap_losses(losses, num_wins=0, ratio=2.0, seed=0) == []


def seven_losses_two_wins(tokenizer):
    examples = [multiple_choice(f"t/{index}", f"Question number {index}?", ("yes", "no"), gold=0) for index in range(9)]
    script = {
        example.question: [completion_from_text(tokenizer, "Answer: A\n" if index < 2 else f"Answer: B {index}\n")]
        for index, example in enumerate(examples)
    }
    return examples, script


def test_client_update_caps_losses_from_the_round_seed(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    examples, script = seven_losses_two_wins(tokenizer)
    chosen = []

    def fake_train(context, work, traces):
        chosen.append([tokenizer.decode(loss.completion) for loss in traces.losses])
        return {}

    monkeypatch.setattr(spear, "train", fake_train)
    config = make_config("spear.prompts_per_round=9", "spear.num_revisions=0", "spear.lose_cap_ratio=1.75")
    context = make_context(model, tokenizer, config)
    global_state = get_adapter_state(model)
    for run_seed in (0, 0, 5):
        monkeypatch.setattr(spearfl.algorithms.base, "generate", ScriptedGeneration(tokenizer, script))
        result = spear.client_update(context, work_order(examples, run_seed=run_seed, global_state=global_state))
        assert result.metrics["wins"] == 2 and result.metrics["losses"] == 3  # floor(1.75 * 2)
        assert result.weight == 5  # the prompts trained on: 2 with a win, 3 with a kept loss
    assert len(chosen[0]) == 3 and chosen[0] == chosen[1]  # same seed, same losses
    assert set(chosen[2]) != set(chosen[0])  # another run seed draws another subset


def test_seeds_of_round_1_client_2_and_round_2_client_1_differ(tokenizer, monkeypatch):
    first = work_order([FRUIT], round_index=1, client_id=2)
    second = work_order([FRUIT], round_index=2, client_id=1)
    for purpose in ("prompts", "first-attempt", "revision-1", "lose-cap", "training-batches", "dropout"):
        assert first.seed(purpose) != second.seed(purpose)
    assert first.seed("prompts") == work_order([ANIMAL], round_index=1, client_id=2).seed("prompts")

    seeds = []
    for work in (first, second, first):
        generation = scripted(monkeypatch, tokenizer, {FRUIT: [completion_from_text(tokenizer, "Answer: A\n")]})
        context = make_context(StubModel(), tokenizer, make_config())
        collect(context, work, [FRUIT], [encode_task(tokenizer, FRUIT)])
        seeds.append(generation.calls[0].seed)
    assert seeds[0] != seeds[1] and seeds[0] == seeds[2]


def test_one_prompt_encoder_for_generation_and_training(tokenizer, monkeypatch):
    """The prompt ids a completion was sampled under are the ids it is trained under: encode_task's."""
    model = tiny_lora_model(tokenizer)
    answers = {
        FRUIT: [completion_from_text(tokenizer, "Answer: A\n", finished_by="eos")],
        ANIMAL: [completion_from_text(tokenizer, "Answer: A\n"), completion_from_text(tokenizer, "Answer: B\n")],
        COLOUR: [completion_from_text(tokenizer, "Answer: B\n"), completion_from_text(tokenizer, "Answer: B\n")],
    }
    generation = scripted(monkeypatch, tokenizer, answers)
    collated = []
    original_collate = spear.collate

    def spy_collate(prompts, completions, pad_id, device):
        collated.append((prompts, completions))
        return original_collate(prompts, completions, pad_id, device)

    monkeypatch.setattr(spear, "collate", spy_collate)
    config = make_config("spear.prompts_per_round=3", "spear.num_revisions=1", "spear.local_steps=2", "spear.lose_cap_ratio=4")
    work = work_order([FRUIT, ANIMAL, COLOUR], lr=1e-2, global_state=get_adapter_state(model))
    result = spear.client_update(make_context(model, tokenizer, config), work)
    assert result.weight == 3  # FRUIT (win), ANIMAL (win and loss), COLOUR (loss)
    encoded = {tuple(encode_task(tokenizer, example)) for example in (FRUIT, ANIMAL, COLOUR)}
    assert {tuple(prompt) for prompt in generation.calls[0].prompts} == encoded
    assert collated, "no training batch was built"
    for prompts, completions in collated:
        assert {tuple(prompt) for prompt in prompts} <= encoded
        sampled = {tuple(c.token_ids) for script in answers.values() for c in script}
        assert {tuple(completion) for completion in completions} <= sampled


def test_answer_prefix_is_one_prompt_for_generation_judging_and_training(tokenizer, monkeypatch):
    """With prompt.answer_prefix the marker sits in the prompt; the completion " A" is judged as "Answer: A"."""
    model = tiny_lora_model(tokenizer)
    answers = {
        FRUIT: [completion_from_text(tokenizer, " A\n")],
        ANIMAL: [completion_from_text(tokenizer, " C\n"), completion_from_text(tokenizer, " B\n")],
    }
    generation = scripted(monkeypatch, tokenizer, answers)
    trained = []
    monkeypatch.setattr(spear, "train", lambda context, work, traces: trained.append((traces.wins, traces.losses)) or {})
    config = make_config("prompt.answer_prefix=true", "spear.prompts_per_round=2", "spear.num_revisions=1")
    context = make_context(model, tokenizer, config)
    prefixed = {example: context.prompts.task(example) for example in (FRUIT, ANIMAL)}
    marker = tokenizer.encode("Answer:", add_special_tokens=False)
    assert all(prompt[-len(marker):] == marker and prompt[: -len(marker)] == encode_task(tokenizer, example)
               for example, prompt in prefixed.items())
    work = work_order([FRUIT, ANIMAL], global_state=get_adapter_state(model))
    result = spear.client_update(context, work)
    assert result.weight == 2
    assert sorted(map(tuple, generation.calls[0].prompts)) == sorted(map(tuple, prefixed.values()))
    wins, losses = trained[0]
    assert sorted((tuple(w.prompt), tuple(w.completion)) for w in wins) == sorted(
        [(tuple(prefixed[FRUIT]), tuple(answers[FRUIT][0].token_ids)), (tuple(prefixed[ANIMAL]), tuple(answers[ANIMAL][1].token_ids))]
    )
    assert [(l.prompt, l.completion) for l in losses] == [(prefixed[ANIMAL], answers[ANIMAL][0].token_ids)]
    revision = tokenizer.decode(generation.calls[1].prompts[0])
    assert "Answer: C" in revision and revision.endswith("Answer:")


# ---------------------------------------------------------------------------------------------- the loss


def test_spear_loss_matches_a_hand_assembly(tokenizer):
    """CE over every win token (EOS included), tail unlikelihood per loss with its own confidence, anchor."""
    model = tiny_lora_model(tokenizer)
    eos = tokenizer.eos_token_id
    prompts = [encode_task(tokenizer, example) for example in (FRUIT, ANIMAL, COLOUR)]

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    wins = [Trace(prompts[0], ids("Answer: A\n") + [eos]), Trace(prompts[1], ids("So, Answer: B\n"))]
    lose_completions = [ids("Answer: C\n") + [eos], ids("Note: it is A. Answer: A")]
    losses = [
        Trace(prompts[1], completion, confidence, protected_token_flags(tokenizer, completion, ["Answer:"]))
        for completion, confidence in zip(lose_completions, (0.9, 0.4))
    ]
    config = make_config(
        "spear.lambda_win=1.0", "spear.lambda_lose=0.5", "spear.lambda_anchor=0.25", "spear.margin=0.0", "spear.tail_tokens=4"
    )
    context = make_context(model, tokenizer, config)
    reference = {name: value.detach() + 0.1 for name, value in lora_parameters(model).items()}
    model.eval()
    total, parts = spear_step(context, Trainer(context), wins, losses, reference)

    def by_hand(scorer):
        """The step's two terms from each token's log-probability, as the module docstring defines them."""
        win_rows = completion_logprobs(scorer, [w.prompt for w in wins], [w.completion for w in wins], batch_size=4)
        lose_rows = completion_logprobs(scorer, [l.prompt for l in losses], [l.completion for l in losses], batch_size=4)
        win_nll = -sum(float(row.sum()) for row in win_rows) / sum(len(row) for row in win_rows)
        per_sequence = []
        for loss, row in zip(losses, lose_rows):
            tail = range(len(loss.completion) - 4, len(loss.completion))
            kept = [t for t in tail if loss.completion[t] != eos and not loss.protected[t]]
            costs = [-math.log(1 - math.exp(float(row[t]))) for t in kept]
            per_sequence.append(loss.confidence * sum(costs) / len(costs))
        return win_nll, sum(per_sequence) / len(per_sequence)

    (win_nll, unlikelihood), (exact_nll, exact_unlikelihood) = by_hand(model), by_hand(float64_twin(model))
    num_lora_values = sum(value.numel() for value in reference.values())
    anchor = 0.01 * num_lora_values  # (0.1)^2 per value: float32 rounding of 0.1 is far below the check's unit
    assert_float32_close(parts["win_nll"], win_nll, exact_nll, "win_nll")
    assert_float32_close(parts["lose_unlikelihood"], unlikelihood, exact_unlikelihood, "lose_unlikelihood")
    assert_float32_close(total, win_nll + 0.5 * unlikelihood + 0.25 * anchor, exact_nll + 0.5 * exact_unlikelihood + 0.25 * anchor)


def test_unlikelihood_skips_every_end_of_turn_id_the_sampler_stops_on(tokenizer):
    """Chat models list several EOS ids in their generation config (Llama-3 instruct, Qwen2.5 instruct); a
    completion the sampler ended with any of them must not have that token pushed down."""
    model = tiny_lora_model(tokenizer)
    other_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, other_end]
    assert other_end != tokenizer.eos_token_id and other_end in eos_token_ids(model, tokenizer)
    prompt = encode_task(tokenizer, COLOUR)
    completion = tokenizer.encode("Answer: A\n", add_special_tokens=False) + [other_end]
    win = Trace(prompt, tokenizer.encode("Answer: C\n", add_special_tokens=False))
    loss = Trace(prompt, completion, 1.0, protected_token_flags(tokenizer, completion, ["Answer:"]))
    config = make_config("spear.margin=0.0", "spear.tail_tokens=2", "spear.lambda_lose=1.0")
    model.eval()
    context = make_context(model, tokenizer, config)
    _, parts = spear_step(context, Trainer(context), [win], [loss], reference={})
    # Score both rows in one batch, padded as spear_step pads them, so the numbers match to float precision.
    newline_only = [  # the tail is "\n" and the end-of-turn id: only "\n" counts
        -math.log(1 - math.exp(float(completion_logprobs(scorer, [prompt, prompt], [win.completion, completion], batch_size=2)[1][-2])))
        for scorer in (model, float64_twin(model))
    ]
    assert_float32_close(parts["lose_unlikelihood"], *newline_only)


# ---------------------------------------------------------------------------------------------- learning


def mean_logprob(model, traces):
    """Mean over completions of the mean token log-likelihood."""
    rows = completion_logprobs(model, [t.prompt for t in traces], [t.completion for t in traces], batch_size=8)
    return sum(float(row.mean()) for row in rows) / len(rows)


def answer_probability(model, traces):
    """Mean probability of the answer letter, the third completion token of "Answer: X\\n"."""
    rows = completion_logprobs(model, [t.prompt for t in traces], [t.completion for t in traces], batch_size=8)
    return sum(float(row[2].exp()) for row in rows) / len(rows)


def primed_lora_model(dropout=0.0):
    """The primed tiny model (answers "Answer: B" to everything, confidently) with a fresh LoRA adapter."""
    model = AutoModelForCausalLM.from_pretrained(end_to_end_assets().model_dir)
    freeze(model)
    return attach_lora(model, LoraConfig(rank=4, alpha=8, dropout=dropout), seed=1)


def learning_setup(tokenizer, *overrides, dropout=0.0):
    """Gold-A items the model answers with a confident "B": win "Answer: A", lose "Answer: B"."""
    model = primed_lora_model(dropout)
    examples = [example for example in load_jsonl(end_to_end_assets().dataset) if example.gold == 0][:6]
    right = tokenizer.encode("Answer: A\n", add_special_tokens=False)
    wrong = tokenizer.encode("Answer: B\n", add_special_tokens=False)
    wins = [Trace(encode_task(tokenizer, example), right) for example in examples]
    flags = protected_token_flags(tokenizer, wrong, ["Answer:"])
    losses = [Trace(encode_task(tokenizer, example), wrong, 1.0, flags) for example in examples]
    config = make_config("spear.local_steps=12", "spear.batch_size=4", *overrides)  # default lambdas and margin
    return model, make_context(model, tokenizer, config), examples, wins, losses


def test_spear_training_raises_wins_lowers_losses_and_moves_only_lora(tokenizer):
    model, context, examples, wins, losses = learning_setup(tokenizer)
    base_before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    lora_before = {name: p.detach().clone() for name, p in lora_parameters(model).items()}
    win_before, lose_before = mean_logprob(model, wins), mean_logprob(model, losses)
    right_before, wrong_before = answer_probability(model, wins), answer_probability(model, losses)
    assert wrong_before > right_before  # the model prefers its wrong answer before training

    metrics = spear.train(context, work_order(examples, lr=1e-2), Traces(wins, losses))

    win_after, lose_after = mean_logprob(model, wins), mean_logprob(model, losses)
    right_after, wrong_after = answer_probability(model, wins), answer_probability(model, losses)
    assert win_after > win_before + 0.04, (win_before, win_after)
    assert lose_after < lose_before - 0.2, (lose_before, lose_after)
    assert right_after > right_before + 0.1 and wrong_after < wrong_before - 0.15
    assert right_after > wrong_after
    assert metrics["trained_tokens"] > 0 and metrics["lose_unlikelihood"] > 0
    for name, value in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(value, base_before[name]), f"base parameter {name} changed"
    lora_after = lora_parameters(model)
    b_matrices = [name for name in lora_after if "lora_B" in name]
    assert len(b_matrices) == 14  # 7 projections x 2 layers
    for name in b_matrices:
        assert not torch.equal(lora_after[name], lora_before[name]), f"{name} did not move"


def test_unlikelihood_alone_pushes_the_losses_down(tokenizer):
    """With lambda_win = 0, only the unlikelihood term acts: it must lower the lose completions."""
    model, context, examples, wins, losses = learning_setup(tokenizer, "spear.lambda_win=0.0", "spear.lambda_lose=1.0")
    lose_before = mean_logprob(model, losses)
    spear.train(context, work_order(examples, lr=1e-2), Traces(wins, losses))
    assert mean_logprob(model, losses) < lose_before - 1.0


def test_training_is_reproducible_from_the_round_seed(tokenizer):
    states = []
    for _ in range(2):
        model, context, examples, wins, losses = learning_setup(tokenizer, "spear.batch_size=2", dropout=0.1)
        spear.train(context, work_order(examples, lr=1e-2), Traces(wins, losses))
        states.append(get_adapter_state(model))
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


# ---------------------------------------------------------------------------------------------- people's answers


def as_interactions(tokenizer, examples, prompts, answers, judge) -> list:
    """Scripted answers stored as a person would have judged them: every attempt until the first right one."""
    interactions = []
    for example, prompt in zip(examples, prompts):
        attempts = []
        for completion in answers[example]:
            correct = judge(example, completion.text).correct
            attempts.append(Attempt(prompt, completion.text, completion.token_ids, 0, completion.finished_by, verdict=correct))
            if correct:
                break
        interactions.append(Interaction(example.uid, example.question, example.options, "", 0.0, attempts))
    return interactions


def test_judged_interactions_make_the_traces_a_simulated_round_makes(tokenizer, monkeypatch):
    """The same answers, sampled and judged in a round or stored with a person's verdicts, give the same wins
    and losses, under the original prompt, on the same ids, with the same confidences and protected tokens."""
    answers = {
        FRUIT: [completion_from_text(tokenizer, "Answer: A\n")],
        ANIMAL: [completion_from_text(tokenizer, "Answer: C\n"), completion_from_text(tokenizer, "Answer: B\n", "eos")],
        COLOUR: [completion_from_text(tokenizer, "Answer: A\n"), completion_from_text(tokenizer, "Answer: B\n")],
    }
    scripted(monkeypatch, tokenizer, answers)
    config = make_config("spear.num_revisions=1", "spear.confidence_fixed=0.9", "spear.confidence_unfixed=0.4")
    context = make_context(StubModel(), tokenizer, config)
    examples = [FRUIT, ANIMAL, COLOUR]
    prompts = [encode_task(tokenizer, example) for example in examples]
    simulated = collect(context, work_order(examples), examples, prompts)
    live = traces_from_interactions(context, as_interactions(tokenizer, examples, prompts, answers, context.feedback))
    assert live == simulated


def test_a_live_round_trains_on_stored_ids_and_generates_nothing(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    answers = {
        FRUIT: [completion_from_text(tokenizer, "Answer: A\n")],
        ANIMAL: [completion_from_text(tokenizer, "Answer: C\n"), completion_from_text(tokenizer, "Answer: B\n")],
        COLOUR: [completion_from_text(tokenizer, "Answer: A\n"), completion_from_text(tokenizer, "Answer: A\n")],
    }
    examples = [FRUIT, ANIMAL, COLOUR]
    prompts = [encode_task(tokenizer, example) for example in examples]
    config = make_config("live.min_interactions=3", "spear.local_steps=2", "spear.lose_cap_ratio=4")
    context = make_context(model, tokenizer, config)
    interactions = as_interactions(tokenizer, examples, prompts, answers, context.feedback)

    def must_not_generate(*args, **kwargs):
        raise AssertionError("a live round generated")

    monkeypatch.setattr(spearfl.algorithms.base, "generate", must_not_generate)
    global_state = get_adapter_state(model)
    result = spear.live_client_update(context, work_order([], lr=1e-2, global_state=global_state), interactions)
    assert result.weight == 3 and result.metrics["skipped"] == 0  # FRUIT (win), ANIMAL (win, loss), COLOUR (loss)
    assert result.metrics["wins"] == 2 and result.metrics["losses"] == 2 and result.metrics["prompts"] == 3
    assert result.metrics["generations"] == 0 and result.metrics["trained_tokens"] > 0
    assert result.metrics["first_try_correct"] == 1 and result.metrics["revised_correct"] == 1
    assert any(not torch.equal(result.state[name], global_state[name]) for name in global_state)


def test_a_live_round_with_too_few_interactions_weighs_nothing(tokenizer, monkeypatch):
    model = tiny_lora_model(tokenizer)
    monkeypatch.setattr(spear, "train", lambda *args: (_ for _ in ()).throw(AssertionError("trained")))
    prompt = encode_task(tokenizer, FRUIT)
    right = completion_from_text(tokenizer, "Answer: A\n")
    interactions = [
        Interaction(f"i{index}", FRUIT.question, FRUIT.options, "", 0.0,
                    [Attempt(prompt, right.text, right.token_ids, 0, "stop", verdict=True)])
        for index in range(3)
    ]
    global_state = perturbed_state(model)
    config = make_config("live.min_interactions=4")
    result = spear.live_client_update(make_context(model, tokenizer, config), work_order([], global_state=global_state), interactions)
    assert result.weight == 0 and result.metrics["skipped"] == 1 and result.metrics["prompts"] == 3
    assert all(torch.equal(result.state[name], global_state[name]) for name in global_state)


def test_a_revision_copied_from_a_hint_that_gave_the_answer_is_no_win(tokenizer):
    context = make_context(StubModel(), tokenizer, make_config("spear.confidence_fixed=0.9"))
    prompt = encode_task(tokenizer, ANIMAL)
    wrong, right = completion_from_text(tokenizer, "Answer: C\n"), completion_from_text(tokenizer, "Answer: B\n")

    def interaction(gave_answer):
        first = Attempt(prompt, wrong.text, wrong.token_ids, 0, "stop", verdict=False, hint="B", hint_gave_answer=gave_answer)
        revision = Attempt(prompt + [5], right.text, right.token_ids, 0, "stop", verdict=True)
        return Interaction("i", ANIMAL.question, ANIMAL.options, "", 0.0, [first, revision])

    wins, losses, metrics = traces_from_interactions(context, [interaction(False)])
    assert [(w.prompt, w.completion) for w in wins] == [(prompt, right.token_ids)]
    wins, losses, metrics = traces_from_interactions(context, [interaction(True)])
    assert wins == [] and [l.confidence for l in losses] == [0.9] and metrics["revised_correct"] == 1
