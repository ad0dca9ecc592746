"""The batch and forward pass every client update trains through.

Rows are prompt + completion ids, left-padded by `spearfl.lm.forward.batch_for_training`, so completions end in
the last column and logits are computed only for the last K positions. Completions are the token ids
that were generated, never re-tokenised text; the same code scores held-out options, so a token is
trained at the position and under the prompt it was sampled with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from spearfl.lm.forward import (
    TokenBatch,
    batch_for_training,
    chunked_distillation,
    chunked_target_logprobs,
    completion_hidden_states,
    completion_token_logits,
    output_layer,
    plain_output_layer,
    token_logprobs,
)
from spearfl.lm.memory import (
    StepPlan,
    layer_checkpointing,
    micro_batches,
    release_free_memory,
    resident_mb,
)


@dataclass
class CompletionBatch:
    """A training batch: the padded rows, plus targets and masks for the last K (completion) positions."""

    tokens: TokenBatch
    targets: torch.Tensor  # [B, K]
    completion_mask: torch.Tensor  # [B, K] bool

    def __len__(self) -> int:
        return self.targets.shape[0]

    def select(self, rows: list[int]) -> CompletionBatch:
        """The batch of `rows` only, its targets still the last K columns: a micro-batch of gradient accumulation.

        Columns that are padding in every selected row are dropped from the left (never one of the last K + 1,
        which predict the targets), so short rows together run no longer than they need.
        """
        index = torch.tensor(rows, device=self.targets.device)
        tokens = TokenBatch(*(tensor[index] for tensor in self.tokens))
        length, width = tokens.input_ids.shape[1], self.targets.shape[1]
        start = min(int((length - tokens.attention_mask.sum(-1)).min()), length - width - 1)
        if start > 0:
            tokens = TokenBatch(*(tensor[:, start:] for tensor in tokens))
        return CompletionBatch(tokens, self.targets[index], self.completion_mask[index])

    def row_lengths(self) -> list[int]:
        """Tokens of each row, padding excluded."""
        return self.tokens.attention_mask.sum(-1).tolist()

    @property
    def num_tokens(self) -> int:
        """Tokens the forward pass processes, padding excluded."""
        return int(self.tokens.attention_mask.sum())

    def right_aligned(self, rows: list[torch.Tensor], fill: float | bool = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Per-token values of each row (one per completion token, or none) as a [B, K, ...] tensor aligned with `targets`."""
        return right_align(rows, self.targets.shape[1], fill, dtype, self.targets.device)


def right_align(
    rows: list[torch.Tensor], width: int, fill: float | bool, dtype: torch.dtype | None = None, device=None
) -> torch.Tensor:
    """Stack rows [n_i, ...] into [B, width, ...], each row ending in the last column, `fill` before it.

    A row's values go to the columns of its last n_i completion tokens, as `collate` lays out the targets.
    """
    dtype = dtype or rows[0].dtype
    stacked = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=dtype, device=device)
    for index, row in enumerate(rows):
        if len(row):
            stacked[index, width - len(row) :] = row.to(stacked.device)
    return stacked


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> CompletionBatch:
    """Build a training batch from prompt ids and the completion ids sampled under them."""
    tokens = TokenBatch(*(tensor.to(device) for tensor in batch_for_training(prompts, completions, pad_id)))
    num_positions = max(len(completion) for completion in completions)
    return CompletionBatch(
        tokens=tokens,
        targets=tokens.input_ids[:, -num_positions:],
        completion_mask=tokens.completion_mask[:, -num_positions:],
    )


def completion_logits(model, batch: CompletionBatch) -> torch.Tensor:
    """Logits predicting each target.  -> [B, K, V]"""
    return completion_token_logits(model, batch.tokens, batch.targets.shape[1])


def target_logprobs(model, batch: CompletionBatch, temperature: float = 1.0, vocabulary_chunk: int = 0) -> torch.Tensor:
    """Log-probability of each target under softmax(logits / temperature), float32.  -> [B, K]

    vocabulary_chunk > 0: the logits of at most that many completion tokens exist at once, forward and backward
    (`chunked_target_logprobs`), where the model's output layer allows it; entries off the completion mask are 0.
    Otherwise the [B, K, V] logits are formed whole.
    """
    if vocabulary_chunk and plain_output_layer(model):
        hidden = completion_hidden_states(model, batch.tokens, batch.targets.shape[1])  # [B, K, H]
        mask = batch.completion_mask
        logprobs = chunked_target_logprobs(hidden[mask], output_layer(model), batch.targets[mask], temperature, vocabulary_chunk)
        return torch.zeros(mask.shape, dtype=logprobs.dtype, device=logprobs.device).masked_scatter(mask, logprobs)
    logits = completion_logits(model, batch)
    return token_logprobs(logits if temperature == 1.0 else logits / temperature, batch.targets)


@dataclass
class MicroBatch:
    """Rows of a step's batch that run forward and backward together (`accumulate_gradients`)."""

    rows: torch.Tensor  # [b] their indices in the step's batch: index the step's per-row tensors with it
    batch: CompletionBatch  # those rows alone
    model: Any
    vocabulary_chunk: int

    def logprobs(self, temperature: float = 1.0) -> torch.Tensor:
        """`target_logprobs` of these rows.  -> [b, K]"""
        return target_logprobs(self.model, self.batch, temperature, self.vocabulary_chunk)

    def logits(self) -> torch.Tensor:
        """`completion_logits` of these rows.  -> [b, K, V]"""
        return completion_logits(self.model, self.batch)

    def hidden_states(self) -> torch.Tensor:
        """The last hidden states the output layer turns into `logits`.  -> [b, K, H]"""
        return completion_hidden_states(self.model, self.batch.tokens, self.batch.targets.shape[1])

    def logprobs_and_distillation(self, teacher_hidden: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Target log-probs (temperature 1) and KL(softmax(t / T) || softmax(s / T)) at each completion token, s the
        student's logits and t those of `teacher_hidden` [b, K, H] (a teacher's `hidden_states`), with the
        vocabulary in chunks (`chunked_distillation`; the plan's `vocabulary_chunk` must be set); 0 off the
        completion mask.  -> [b, K] twice"""
        mask, layer = self.batch.completion_mask, output_layer(self.model)
        logprobs, kl = chunked_distillation(
            self.hidden_states()[mask], teacher_hidden[mask], layer, self.batch.targets[mask], temperature, self.vocabulary_chunk
        )
        return tuple(torch.zeros(mask.shape, dtype=value.dtype, device=value.device).masked_scatter(mask, value) for value in (logprobs, kl))


# A micro-batch's share of a step's loss, and its shares of the step's reported parts. Shares must add up to the
# step's loss: a mean over the step's tokens divides by the count of the whole step's batch, not the micro-batch's.
Contribution = Callable[[MicroBatch], tuple[torch.Tensor, dict[str, float]]]


def accumulate_gradients(model, batch: CompletionBatch, plan: StepPlan, contribution: Contribution) -> tuple[float, dict[str, float]]:
    """Forward and backward each micro-batch of `plan` in turn, gradients adding up in the parameters' .grad.

    Returns the step's loss and its parts, each the sum of the micro-batches' shares. With one micro-batch this is
    the plain step; with several the gradient is the same sum, in another order (float32 rounding apart).
    """
    total, parts = 0.0, {}
    ceiling_mb = None
    if plan.checkpoint and batch.targets.device.type == "cpu":
        # freed memory goes back to the system when the process holds more than this step was planned to add to what
        # it uses now (handed back first, or the last step's freed blocks would raise every later step's ceiling)
        release_free_memory()
        ceiling_mb = resident_mb() + plan.estimated_mb
    with layer_checkpointing(model, plan.checkpoint, ceiling_mb):
        groups = micro_batches(batch.row_lengths(), plan.micro_batch_rows)
        for rows in groups:
            selected = batch if len(groups) == 1 else batch.select(rows)
            micro = MicroBatch(torch.tensor(rows, device=batch.targets.device), selected, model, plan.vocabulary_chunk)
            loss, shares = contribution(micro)
            if loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
            if len(groups) > 1:
                release_free_memory()  # what this micro-batch freed, before the next one allocates
            for key, value in shares.items():
                parts[key] = parts.get(key, 0.0) + value
    return total, parts


def make_optimizer(parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters, fresh each client round: its state never leaves the client."""
    return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=lr, weight_decay=weight_decay)


class StepConstraint(Protocol):
    """A projection around each optimizer step: in simulation, an attack that constrains its training
    (spearfl.runtime.adversary); honest clients have none."""

    def project_gradients(self) -> None:
        """Before clipping and the step: project the accumulated gradients in place."""

    def project_parameters(self) -> None:
        """After the step: project the parameters in place."""


def optimizer_step(
    optimizer: torch.optim.Optimizer, parameters, max_grad_norm: float | None, constraint: StepConstraint | None = None
) -> None:
    """Clip the gradient norm of `parameters` if asked, step, and clear the gradients for the next step; a
    `constraint` projects the gradients before and the parameters after."""
    if constraint is not None:
        constraint.project_gradients()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    if constraint is not None:
        constraint.project_parameters()
    optimizer.zero_grad(set_to_none=True)
