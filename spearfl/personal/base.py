"""What every personalization method shares: the client's personal adapter beside the global one, the round that
trains one or both, what of it may leave the device, and the training after federation.

A method (`PersonalMethod`) answers five questions; the defaults are today's federated client (`none`):
- `round_start`: the adapter a client's federated update starts from (the global one; FedPer's personal modules;
  `local`: the personal adapter);
- `personal_pass`: a second training of the round's collected data from the personal adapter (Ditto, TAP), or
  None;
- `personal_after_round`: the personal adapter once the round is trained;
- `shared`: what of the trained adapter leaves the device (FedPer: the shared modules only, the personal ones
  sent back as the global adapter had them, so they carry nothing of the client's);
- `after_federation`: the training that ends the federation (fine-tuning; TAP's distillation), or nothing.

Only `shared(...)` ever leaves: the personal adapter stays where the client keeps it (the run folder's checkpoint
in simulation, the device's folder live, the node's state on Flower).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spearfl.algorithms import CONFIG_SECTIONS
from spearfl.algorithms.base import (
    ClientContext,
    ClientResult,
    ClientRound,
    Collected,
    PersonalPass,
    Sampler,
    Trainer,
    client_round,
    draw,
    envelope,
    train_steps,
)
from spearfl.data.schema import Example
from spearfl.lm.forward import (
    at_least_float32,
    chunked_target_logprobs,
    completion_hidden_states_from,
    hidden_states_entering,
    output_layer,
    plain_output_layer,
    token_logprobs,
)
from spearfl.lm.models import evaluation_mode, lora_parameters, set_adapter_state
from spearfl.lm.training import MicroBatch, collate, target_logprobs
from spearfl.losses.common import masked_mean
from spearfl.losses.distill import tempered_batchmean, tempered_distillation_loss
from spearfl.seeds import derive_seed

AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class JudgedAnswer:
    """An answer a person judged on a live device: the prompt it answered, its tokens, and whether it was right."""

    prompt: list[int]
    completion: list[int]
    correct: bool


@dataclass
class PersonalClient:
    """One client as a personalization method sees it: its id, training pool and validation split, and its personal
    adapter (None until it has one: the method then starts it from the global adapter).

    A live device has no gold answers: its validation split is answers its people judged right (`JudgedAnswer`), and
    `judged` holds the judged answers its training after federation learns from (None: a simulation, which answers
    and judges its own prompts)."""

    client_id: int
    examples: list[Example]
    validation: list[Example] | list[JudgedAnswer]
    personal: AdapterState | None = None
    judged: list[JudgedAnswer] | None = None


class PersonalMethod:
    """Today's federated client: one global adapter, no personal one (`personal.method: none`)."""

    keeps_personal = False  # whether clients keep a personal adapter at all
    federated = True  # whether the client sends its update (`local` trains alone)
    uses_validation = False  # whether it reads the client's validation split (TAP's replacement)

    def __init__(self, settings) -> None:
        self.settings = settings  # spearfl.config.PersonalConfig

    def personal_of(self, client: PersonalClient, global_state: AdapterState) -> AdapterState:
        """The adapter the client answers with: its personal one, the global one where it has none yet."""
        return clone(global_state if client.personal is None else client.personal)

    def personal_start(self, client: PersonalClient, global_state: AdapterState) -> AdapterState:
        """The personal adapter a round trains: the client's own, or where it has none yet the base model
        (`base_adapter`), as TAP's and Ditto's clients start their personal models from the initial model and not
        from the global one of the round they are first chosen in (TAP_final/main_training.py creates every
        client's personal model before round 1)."""
        return clone(client.personal) if client.personal is not None else base_adapter(global_state)

    def round_start(self, client: PersonalClient, global_state: AdapterState) -> AdapterState:
        return global_state

    def personal_pass(self, client: PersonalClient, global_state: AdapterState) -> PersonalPass | None:
        return None

    def personal_after_round(
        self, client: PersonalClient, global_state: AdapterState, trained: ClientResult, personal_pass: PersonalPass | None
    ) -> AdapterState | None:
        """The personal adapter after the round: the pass's, where one trained, else as it was."""
        if personal_pass is not None and personal_pass.state is not None:
            return personal_pass.state
        return client.personal

    def shared(self, trained: AdapterState, global_state: AdapterState) -> AdapterState:
        return trained

    def after_federation(
        self, context: ClientContext, client: PersonalClient, global_state: AdapterState, round_index: int
    ) -> tuple[AdapterState | None, dict]:
        """(the personal adapter once the federation ends, the metrics of that training)."""
        return client.personal, {}


def base_adapter(state: AdapterState) -> AdapterState:
    """`state` with every LoRA B zero: the base model's function (the initial adapter's, B being initialised to
    zero), in the coordinates of `state`'s A matrices."""
    return {name: torch.zeros_like(tensor) if ".lora_B." in name else tensor.detach().clone() for name, tensor in state.items()}


def clone(state: AdapterState) -> AdapterState:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def with_modules(state: AdapterState, source: AdapterState, names) -> AdapterState:
    """`state` with the tensors `names` taken from `source`."""
    names = set(names)
    return {name: (source[name] if name in names else tensor).clone() for name, tensor in state.items()}


LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a LoRA tensor belongs to, from its name (`...layers.3.self_attn.q_proj.lora_A.weight`)."""
    match = LAYER.search(name)
    return None if match is None else int(match.group(1))


def first_layer(names) -> int:
    """The lowest decoder layer among LoRA tensor `names`: a change to them leaves the hidden states entering it as
    they were (0 where one of them is outside the layers, or for no names)."""
    layers = [layer_of(name) for name in names]
    return 0 if not layers or None in layers else min(layers)


def module_groups(names, unit: str) -> dict[str, list[str]]:
    """LoRA tensor names grouped into modules, in order: by decoder layer ("layer"), by adapted projection
    ("projection": a LoRA A with its B), or all in one ("adapter"). Tensors outside any layer form "other"."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=lambda name: (layer_of(name) is None, layer_of(name) or 0, name)):
        if unit == "adapter":
            key = "adapter"
        elif unit == "projection":
            key = name.split(".lora_", 1)[0]
        else:
            layer = layer_of(name)
            key = "other" if layer is None else f"layer {layer}"
        groups.setdefault(key, []).append(name)
    return groups


def correct_answer(context: ClientContext, item: Example | JudgedAnswer) -> tuple[list[int], list[int]]:
    """(prompt, a correct answer) of a validation item: an example's task prompt and gold answer line, or an answer
    a person judged right under the prompt it answered."""
    if isinstance(item, JudgedAnswer):
        return item.prompt, item.completion
    return context.prompts.task(item), context.prompts.option_completion(item.gold_label)


VALIDATION_CHUNK = 32  # answer tokens whose vocabulary logits exist at once while measuring the validation loss
VALIDATION_ROWS = 8  # rows of a validation forward: the demo's training step has 8 wins and 8 losses


class ValidationSplit:
    """A client's validation split, scored again and again under adapters that differ from one another only from
    some decoder layer on (TAP's replacement, module by module in layer order).

    `loss()` is TAP's per-task loss (the mean negative log-likelihood per token of each item's correct answer after
    its prompt, cross-entropy averaged over tokens) under the model's adapter as it stands. `keep_to(layer)` keeps
    the hidden states entering `layer` under the adapter as it stands; later losses then run only the layers from
    there on, which is exact for any adapter that differs from that one in those layers alone. A simulation knows
    the answers from its data (the gold answer line), a device from its people's verdicts (the answers they judged
    right)."""

    def __init__(self, context: ClientContext, items: list[Example] | list[JudgedAnswer]):
        self.model, tokenizer = context.model, context.prompts.tokenizer
        # rows of a training step at most: a forward of the evaluation's batch size outgrows the round's planned room
        size = min(context.config.eval.batch_size, VALIDATION_ROWS)
        self.batches = []
        for start in range(0, len(items), size):
            pairs = [correct_answer(context, item) for item in items[start : start + size]]
            self.batches.append(collate([p for p, _ in pairs], [a for _, a in pairs], tokenizer.pad_token_id, context.device))
        self.tokens = sum(int(batch.completion_mask.sum()) for batch in self.batches)
        # layers can be skipped only where log-probs are the output layer of the last hidden state
        self.layered = plain_output_layer(self.model)
        self.layer, self.hidden = 0, [None] * len(self.batches)  # hidden states entering self.layer (None: embeddings)

    @torch.no_grad()
    def keep_to(self, layer: int) -> None:
        """Keep the hidden states entering decoder `layer` under the model's adapter as it stands (from the
        embeddings again where `layer` is below the layer kept so far)."""
        if not self.layered:
            return
        if layer < self.layer:
            self.layer, self.hidden = 0, [None] * len(self.batches)
        with evaluation_mode(self.model):
            self.hidden = [hidden_states_entering(self.model, batch.tokens, layer, self.layer, hidden)
                           for batch, hidden in zip(self.batches, self.hidden)]
        self.layer = layer

    @torch.no_grad()
    def loss(self) -> float:
        total = 0.0
        with evaluation_mode(self.model):
            for batch, hidden in zip(self.batches, self.hidden):
                mask = batch.completion_mask
                if self.layered:
                    states = completion_hidden_states_from(self.model, batch.tokens, self.layer, hidden, batch.targets.shape[1])
                    # the vocabulary's logits of at most VALIDATION_CHUNK answer tokens at once: a batch's whole
                    # [B, K, V] logits would outgrow the working memory a round's training is planned in
                    logprobs = chunked_target_logprobs(states[mask], output_layer(self.model), batch.targets[mask], 1.0, VALIDATION_CHUNK)
                else:
                    logprobs = target_logprobs(self.model, batch)[mask]
                total -= float(logprobs.double().sum())
        return total / max(self.tokens, 1)


def validation_loss(context: ClientContext, items: list[Example] | list[JudgedAnswer]) -> float:
    """`ValidationSplit.loss` of `items` under the model's adapter as it stands, every layer run."""
    return ValidationSplit(context, items).loss()


@dataclass
class Sample:
    prompt: list[int]
    completion: list[int]
    correct: bool


def after_federation_round(
    context: ClientContext,
    client: PersonalClient,
    start: AdapterState,
    teacher: AdapterState | None,
    round_index: int,
) -> ClientResult:
    """The training that ends a federation, on the client's own prompts: one round's prompts answered by the
    adapter being trained (`start`) and judged by the client's feedback (on a live device: the answers its people
    judged, `client.judged`, the newest round's worth), then `personal.after_steps` steps at
    `personal.after_lr` on the cross-entropy of its correct answers (averaged over their tokens), plus, with a
    teacher, `tap.distill_weight` x T^2 x KL(teacher || student) over every answer's tokens (summed over a
    completion, averaged over completions): TAP's stage 2 (utils/training.py train_finetune); without a teacher,
    local fine-tuning. Returns the trained adapter (the start one when there was nothing to learn from)."""
    settings, tap = context.config.personal, context.config.personal.tap
    num_prompts = context.config.budget(CONFIG_SECTIONS[context.config.algorithm]).prompts_per_round
    run_seed = derive_seed(context.config.seed, round_index, client.client_id, "after-federation")
    work = ClientRound(client.client_id, round_index, client.examples, start, settings.after_lr, run_seed)
    weight = tap.distill_weight if teacher is not None else 0.0

    def collect(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> Collected:
        completions, feedback = sample(prompts, examples, "after-federation", "answers")
        verdicts = [verdict.correct for verdict in feedback]
        return judged_samples(context, work, prompts, [completion.token_ids for completion in completions], verdicts)

    def judged_samples(context: ClientContext, work: ClientRound, prompts, generated, verdicts) -> Collected:
        samples = [Sample(p, c, correct) for p, c, correct in zip(prompts, generated, verdicts)]
        trained = samples if weight > 0 else [s for s in samples if s.correct]
        metrics = {"first_try_correct": sum(verdicts), "wins": sum(verdicts)}
        return Collected(trained, float(len(trained)), metrics)

    def train(context: ClientContext, work: ClientRound, samples: list[Sample]) -> dict:
        def step_gradient(rng, step, trainer):
            return after_federation_step(context, trainer, draw(samples, num_prompts, rng), teacher, weight, tap.temperature)

        return train_steps(context, work, settings.after_steps, step_gradient)

    if client.judged is None:
        return client_round(context, work, num_prompts, collect, train)
    answers = client.judged[:num_prompts]

    def gather(sampler: Sampler) -> tuple[int, Collected]:
        prompts, generated = [a.prompt for a in answers], [a.completion for a in answers]
        return len(answers), judged_samples(context, work, prompts, generated, [a.correct for a in answers])

    return envelope(context, work, gather, train)


def after_federation_step(
    context: ClientContext, trainer: Trainer, samples: list[Sample], teacher: AdapterState | None, weight: float, temperature: float
):
    """One step's gradient of CE(correct answers) + weight x T^2 KL(teacher || student) (see after_federation_round).

    The teacher runs micro-batch by micro-batch, beside the student (`under_adapter`). Where the plan takes the
    vocabulary in chunks, the teacher keeps only its last hidden states and the two logits meet a chunk of tokens
    at a time (`MicroBatch.logprobs_and_distillation`), so the step is planned as the other methods' chunked steps
    are, with no [tokens, V] tensor of the teacher's or the student's. Otherwise (an output layer with a logit
    transform) both are whole, planned as 8 such tensors at once."""
    batch = collate([s.prompt for s in samples], [s.completion for s in samples], context.prompts.tokenizer.pad_token_id, context.device)
    correct = torch.tensor([s.correct for s in samples], device=context.device)
    win_tokens = int(batch.completion_mask[correct].sum())
    model = context.model

    def contribution(micro: MicroBatch) -> tuple[torch.Tensor, dict]:
        mask = micro.batch.completion_mask
        wins = correct[micro.rows]
        shares = {"trained_tokens": micro.batch.num_tokens}
        if weight > 0 and micro.vocabulary_chunk:
            teacher_hidden = under_adapter(model, teacher, micro.hidden_states)  # [b, K, H]
            logprobs, kl = micro.logprobs_and_distillation(teacher_hidden, temperature)
            distill = weight * tempered_batchmean(kl, mask, temperature, len(samples))
        elif weight > 0:
            teacher_logprobs = under_adapter(model, teacher, lambda: torch.log_softmax(at_least_float32(micro.logits()), dim=-1))  # [b, K, V]
            logits = micro.logits()  # [b, K, V]
            logprobs = token_logprobs(logits, micro.batch.targets)
            distill = weight * tempered_distillation_loss(teacher_logprobs, logits, mask, temperature, len(samples))
        else:
            logprobs, distill = micro.logprobs(), 0.0
        if weight > 0:
            shares["scored_tokens"] = micro.batch.num_tokens
            shares["distillation"] = float(distill.detach())
        task = masked_mean(-logprobs, mask & wins.unsqueeze(-1), win_tokens)
        shares["task_nll"] = float(task.detach())
        return task + distill, shares

    return trainer(batch, contribution, logit_tensors=8 if weight > 0 else 4)


@torch.no_grad()
def under_adapter(model, state: AdapterState, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`forward()` with the adapter `state` in the model, without dropout; the model's own LoRA weights are back in
    place after, before its forward (and any checkpointed recomputation) of the same rows."""
    # copies in the model's own dtype and device (get_adapter_state's float32 CPU copies would round a float64 model)
    own = {name: parameter.detach().clone() for name, parameter in lora_parameters(model).items()}
    set_adapter_state(model, state)
    try:
        with evaluation_mode(model):
            return forward()
    finally:
        set_adapter_state(model, own)
