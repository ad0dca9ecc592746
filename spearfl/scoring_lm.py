"""Log-likelihood of given completion token ids after given prompts, in batches.

Rows are prompt + completion, LEFT-padded, so that every completion ends in the last column: the
model then computes logits only for the last K positions (K = the longest completion in the batch)
instead of over the whole vocabulary at every prompt position. Position ids count real tokens only,
as in generation, so a token is scored at the position where it was sampled. Completions are token
ids (what `generate` returned, or an option's encoding), never re-tokenised text.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DynamicCache

from spearfl.models import evaluation_mode

PADDING_ID = 0  # any id will do: padding is masked out of attention and never a target


class TokenBatch(NamedTuple):
    """Left-padded prompt + completion rows."""

    input_ids: torch.Tensor  # [B, T] prompt then completion ids, pad_id on the left
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens, 0 on padding
    completion_mask: torch.Tensor  # [B, T] True on completion tokens: exactly the training targets
    position_ids: torch.Tensor  # [B, T] 0 at each row's first real token


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sequences of different lengths, padding on the left.  -> ids [B, T], attention mask [B, T]"""
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, length - len(sequence) :] = 1
    return input_ids, attention_mask


def batch_for_training(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> TokenBatch:
    """Rows of prompt + completion ids, left-padded; the completion ids are the targets, unchanged."""
    if any(not prompt for prompt in prompts) or any(not completion for completion in completions):
        raise ValueError("every prompt and every completion needs at least one token")
    input_ids, attention_mask = left_pad([p + c for p, c in zip(prompts, completions, strict=True)], pad_id)
    completion_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, completion in enumerate(completions):
        completion_mask[row, -len(completion) :] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention_mask, completion_mask, position_ids)


def completion_token_logits(model, batch: TokenBatch) -> torch.Tensor:
    """Logits predicting each of the last K tokens, K = the longest completion.  -> [B, K, V]

    They line up with `batch.input_ids[:, -K:]` (targets) and `batch.completion_mask[:, -K:]`.
    """
    num_positions = int(batch.completion_mask.sum(-1).max())
    length = batch.input_ids.shape[1]
    # Position t predicts token t + 1, so the logits come from the K positions before the last.
    predicting = torch.arange(length - num_positions - 1, length - 1, device=batch.input_ids.device)
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=predicting,
    ).logits


@torch.no_grad()
def completion_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], batch_size: int
) -> list[torch.Tensor]:
    """Log-probability of each completion token given the prompt and the tokens before it.

    Returns one float32 CPU tensor [len(completion)] per (prompt, completion) pair, in input order.
    Dropout is off while scoring, whatever mode the model was in.
    """
    with evaluation_mode(model):
        return score_in_batches(model, prompts, completions, batch_size)


def score_in_batches(
    model, prompts: list[list[int]], completions: list[list[int]], batch_size: int
) -> list[torch.Tensor]:
    """`completion_logprobs` in whatever mode the model is in."""
    device = next(model.parameters()).device
    # Similar total lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]) + len(completions[index]))
    results: list[torch.Tensor | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = batch_for_training([prompts[i] for i in rows], [completions[i] for i in rows], PADDING_ID)
        batch = TokenBatch(*(tensor.to(device) for tensor in batch))
        logits = completion_token_logits(model, batch).float()  # [B, K, V]
        targets = batch.input_ids[:, -logits.shape[1] :]  # [B, K]
        token_logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)  # [B, K]
        for position, index in enumerate(rows):
            results[index] = token_logprobs[position, -len(completions[index]) :].cpu()
    return results


def sequence_logprob(model, prompts: list[list[int]], completions: list[list[int]], batch_size: int) -> torch.Tensor:
    """Total log-probability of each completion given its prompt.  -> [N] float32, CPU"""
    return torch.stack([row.sum() for row in completion_logprobs(model, prompts, completions, batch_size)])



@torch.no_grad()
def option_logprobs(
    model, prompts: list[list[int]], options: list[list[list[int]]], batch_size: int
) -> list[list[float]]:
    """Total log-probability of each option's ids after its prompt: options[i][j] scored after prompts[i].

    Each prompt runs once; its key/value cache is copied to every option row, so an n-option question
    costs one prompt plus n short continuations instead of n full sequences.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    totals: list[list[float] | None] = [None] * len(prompts)
    with evaluation_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            scores = score_options_batch(model, [prompts[i] for i in rows], [options[i] for i in rows], device)
            for index, row_scores in zip(rows, scores):
                totals[index] = row_scores
    return totals


def prefill(model, prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    """Run left-padded prompts once, keeping their key/value cache.

    Returns the attention mask [B, P], the logits at each prompt's last position [B, V], and the cache.
    """
    input_ids, attention_mask = (tensor.to(device) for tensor in left_pad(prompts, PADDING_ID))  # [B, P]
    cache = DynamicCache()
    last_logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    return attention_mask, last_logits, cache


def score_options_batch(model, prompts, options, device) -> list[list[float]]:
    """One batch of `option_logprobs`: prompts left-padded, options right-padded after the cached prompts."""
    attention_mask, last_logits, cache = prefill(model, prompts, device)
    last_logits = last_logits.float()  # [B, V]
    owners = torch.tensor([i for i, choices in enumerate(options) for _ in choices], device=device)  # [R]
    flat = [choice for choices in options for choice in choices]
    length = max(len(choice) for choice in flat)
    option_ids = torch.full((len(flat), length), PADDING_ID, dtype=torch.long, device=device)  # [R, L]
    option_mask = torch.zeros((len(flat), length), dtype=torch.long, device=device)  # [R, L]
    for row, choice in enumerate(flat):
        option_ids[row, : len(choice)] = torch.tensor(choice, device=device)
        option_mask[row, : len(choice)] = 1
    cache.batch_select_indices(owners)
    prompt_lengths = attention_mask.sum(-1)[owners]  # [R]
    logits = model(
        input_ids=option_ids,
        attention_mask=torch.cat([attention_mask[owners], option_mask], dim=-1),
        position_ids=prompt_lengths[:, None] + torch.arange(length, device=device),
        cache=cache,
        use_cache=True,
    ).logits.float()  # [R, L, V]
    # Token 0 of an option is predicted by the prompt's last position, token t by option position t - 1.
    predicting = torch.cat([last_logits[owners][:, None], logits[:, :-1]], dim=1)  # [R, L, V]
    token_logprobs = predicting.gather(-1, option_ids[..., None]).squeeze(-1) - predicting.logsumexp(-1)  # [R, L]
    sums = (token_logprobs * option_mask).sum(-1).tolist()  # [R]
    scores, row = [], 0
    for choices in options:
        scores.append(sums[row : row + len(choices)])
        row += len(choices)
    return scores
