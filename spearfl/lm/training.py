"""The batch and forward pass every client update trains through.

Rows are prompt + completion ids, left-padded by `scoring_lm.batch_for_training`, so completions end in
the last column and logits are computed only for the last K positions. Completions are the token ids
that were generated, never re-tokenised text; the same code scores held-out options, so a token is
trained at the position and under the prompt it was sampled with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from spearfl.lm.forward import TokenBatch, batch_for_training, completion_token_logits


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

    def right_aligned(self, rows: list[list[bool]]) -> torch.Tensor:
        """Place one flag per completion token into a [B, K] tensor aligned with `targets`."""
        values = torch.zeros(self.targets.shape, dtype=torch.bool)
        for row, row_values in enumerate(rows):
            if row_values:
                values[row, -len(row_values):] = torch.tensor(row_values, dtype=torch.bool)
        return values.to(self.targets.device)


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


def make_optimizer(parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters, fresh each client round: its state never leaves the client."""
    return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=lr, weight_decay=weight_decay)


Item = TypeVar("Item")


def draw(items: list[Item], count: int, rng: np.random.Generator) -> list[Item]:
    """Up to `count` items without replacement (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[int(index)] for index in rng.choice(len(items), size=count, replace=False)]


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters, max_grad_norm: float | None) -> None:
    """Backward, clip the gradient norm of `parameters` if asked, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
