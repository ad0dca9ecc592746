"""The batch and forward pass every client update trains through.

Rows are prompt + completion ids, left-padded by `spearfl.lm.forward.batch_for_training`, so completions end in
the last column and logits are computed only for the last K positions. Completions are the token ids
that were generated, never re-tokenised text; the same code scores held-out options, so a token is
trained at the position and under the prompt it was sampled with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spearfl.lm.forward import (
    TokenBatch,
    batch_for_training,
    completion_token_logits,
    token_logprobs,
)


@dataclass
class CompletionBatch:
    """A training batch: the padded rows, plus targets and masks for the last K (completion) positions."""

    tokens: TokenBatch
    targets: torch.Tensor  # [B, K]
    completion_mask: torch.Tensor  # [B, K] bool

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
    return completion_token_logits(model, batch.tokens)


def target_logprobs(model, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each target under softmax(logits / temperature), float32.  -> [B, K]"""
    logits = completion_logits(model, batch)
    return token_logprobs(logits if temperature == 1.0 else logits / temperature, batch.targets)


def make_optimizer(parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters, fresh each client round: its state never leaves the client."""
    return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=lr, weight_decay=weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters, max_grad_norm: float | None) -> None:
    """Backward, clip the gradient norm of `parameters` if asked, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
