"""`personal.method: tap`: TAP, two-stage adaptive personalization (Lee, Fang, Han et al., arXiv 2509.26524; code
github lee3296/TAP, TAP_final/utils/training.py and main_training.py).

During federation, each round, as TAP's client does: the global adapter trains on the round's data and is sent (the
"regular" client model); then the personal adapter takes, module by module, the modules of that locally trained
global adapter where they lower the loss on the client's validation split by more than `tap.margin` (TAP's rule:
teacher loss + margin < student loss), and trains on the same round's data (so the round's prompts and feedback
are the budget's, only its steps are taken twice). TAP compares the two models' training losses of the round; here
both are measured on the client's own validation split, after each replacement, so a module is replaced if and only
if the validation loss, with the modules kept so far, falls by more than the margin.

After federation (stage 2): the personal adapter trains on the client's own prompts on the cross-entropy of its
correct answers plus `tap.distill_weight` x T^2 x KL(global || personal) (`after_federation_round`), the final
global adapter the teacher. TAP first fine-tunes that teacher on the client's data; here the global adapter
teaches as it is, so that stage 2 costs one round of the client's budget, as `finetune`'s does.

Then, where `tap.final_check` is set (our addition, off by default, as TAP's code has no such step): stage 1's
rule once more, the final global adapter the candidate, so that the personal adapter keeps no module that does
worse on the client's own validation split than the global one's. Stage 2 trains every module on a handful of the client's answers, and a client that was never
chosen starts it from the base model (`personal_start`): without the check such a client could end below the
global adapter that it never compared itself with.

Where `tap.final_gate` is set (our addition, off by default, as TAP's code has no such step), the very last word:
the client scores its personal adapter and the final global one on its validation split, and keeps the personal one
only where it is strictly better there; otherwise it answers with the global adapter. In simulation the score is
the greedy accuracy, as the held-out evaluation counts it (`validation_accuracy`); a device, whose validation split
is answers its people judged right and holds no gold label, scores the validation loss of those answers, the
personal adapter kept where it is lower by more than `tap.margin`. TAP promises that selective replacement leaves no
client below the global model; a loss measured module by module on a handful of answers does not keep that promise
in greedy accuracy (docs/results.md, "Personalization"), and the gate makes the choice in the measure it is judged by.
"""

from __future__ import annotations

import time

from spearfl.algorithms.base import ClientContext, PersonalPass
from spearfl.data.schema import Example
from spearfl.data.scoring import is_correct
from spearfl.lm.generation import SamplingSettings, generate
from spearfl.lm.models import evaluation_mode, set_adapter_state
from spearfl.personal.base import (
    VALIDATION_ROWS,
    AdapterState,
    JudgedAnswer,
    PersonalClient,
    PersonalMethod,
    ValidationSplit,
    after_federation_round,
    clone,
    first_layer,
    module_groups,
    validation_loss,
    with_modules,
)


def replace_modules(context, personal: AdapterState, teacher: AdapterState, validation, margin: float, unit: str) -> tuple[AdapterState, list[str]]:
    """Stage 1: `personal` with each module of `teacher` taken, in order, where it lowers the validation loss by more
    than `margin`; (the adapter, the modules replaced).

    Modules come in layer order, and a module's candidate differs from the adapter kept so far only from the
    module's first layer on: the hidden states entering that layer are kept once (`ValidationSplit.keep_to`), and
    each candidate runs the layers from there on only (the demo's LoRA layers are the top 8 of 30)."""
    split = ValidationSplit(context, validation)
    groups = module_groups(personal, unit)
    current = personal
    set_adapter_state(context.model, current)
    split.keep_to(first_layer(next(iter(groups.values()), [])))
    loss = split.loss()
    replaced = []
    for module, names in groups.items():
        split.keep_to(first_layer(names))  # under `current`, the adapter kept so far
        candidate = with_modules(current, teacher, names)
        set_adapter_state(context.model, candidate)
        candidate_loss = split.loss()
        if candidate_loss + margin < loss:
            current, loss = candidate, candidate_loss
            replaced.append(module)
        set_adapter_state(context.model, current)
    return current, replaced


def validation_accuracy(context: ClientContext, examples: list[Example]) -> float:
    """The greedy accuracy of the model's adapter as it stands on `examples`, counted as the held-out evaluation
    counts it (spearfl.runtime.evaluation: the eval settings' token limit, the answer read after the prompt's prefix,
    the first or, for chain of thought, the last declared answer)."""
    prompts, settings = context.prompts, context.config.eval
    # rows of a training step at most, as the validation loss keeps to (VALIDATION_ROWS)
    greedy = SamplingSettings(settings.max_new_tokens, 0.0, 1.0, min(settings.batch_size, VALIDATION_ROWS), text_prefix=prompts.prefix)
    with evaluation_mode(context.model):
        completions = generate(context.model, prompts.tokenizer, [prompts.task(example) for example in examples], settings=greedy, seed=0)
    answers = [prompts.answer_text(completion.text) for completion in completions]
    return sum(is_correct(example, answer, prompts.last_answer) for example, answer in zip(examples, answers)) / len(examples)


def gate(
    context: ClientContext, personal: AdapterState, global_state: AdapterState, validation: list[Example] | list[JudgedAnswer], margin: float
) -> tuple[AdapterState, dict]:
    """The final gate (`tap.final_gate`): (`personal` where it scores strictly better on `validation` than
    `global_state`, else a copy of `global_state`; the two scores and which was kept). Examples score their greedy
    accuracy, strictly better meaning at least one more answer right; a device's judged answers score minus their
    validation loss, better meaning by more than `margin`. The model is left with the adapter kept."""
    by_accuracy = all(isinstance(item, Example) for item in validation)

    def score(state: AdapterState) -> float:
        set_adapter_state(context.model, state)
        return validation_accuracy(context, validation) if by_accuracy else -validation_loss(context, validation)

    scores = {"personal": score(personal), "global": score(global_state)}
    keep = scores["personal"] > scores["global"] + (0.0 if by_accuracy else margin)
    kept = personal if keep else clone(global_state)
    set_adapter_state(context.model, kept)
    measure = "accuracy" if by_accuracy else "minus loss"
    return kept, {"measure": measure, **scores, "kept": "personal" if keep else "global"}


class Tap(PersonalMethod):
    keeps_personal = True
    uses_validation = True

    def personal_pass(self, client: PersonalClient, global_state: AdapterState) -> PersonalPass:
        settings, notes = self.settings.tap, {}

        def start(context, trained):
            started = time.perf_counter()
            personal, notes["replaced"] = replace_modules(
                context, self.personal_start(client, global_state), trained, client.validation, settings.margin, settings.modules
            )
            notes["stage_one_seconds"] = time.perf_counter() - started
            return personal

        return PersonalPass(start, notes=notes)

    def after_federation(self, context, client, global_state, round_index):
        settings = self.settings.tap
        result = after_federation_round(context, client, self.personal_start(client, global_state), global_state, round_index)
        state, metrics = result.state, dict(result.metrics)
        if settings.final_check and client.validation:
            started = time.perf_counter()
            state, metrics["final_replaced"] = replace_modules(
                context, state, global_state, client.validation, settings.margin, settings.modules
            )
            metrics["final_check_seconds"] = time.perf_counter() - started
        if settings.final_gate and client.validation:
            started = time.perf_counter()
            state, metrics["final_gate"] = gate(context, state, global_state, client.validation, settings.margin)
            metrics["final_gate_seconds"] = time.perf_counter() - started
        return state, metrics
