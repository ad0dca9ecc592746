"""Key/value states of prompts a client has already run, reused by later prompts that begin the same way.

A revision prompt begins with the tokens of its task prompt (the chat only grows: task, answer, feedback),
and every prompt of a chat model begins with the same system turn. `PrefixCache` keeps, for each prompt a
client round has prefilled, the keys and values of each layer; `prefill_reusing` then runs only the tokens
after the longest stored common prefix. Keys and values of a token depend on the tokens before it alone,
so the result equals a full prefill (up to float rounding, as batching already allows).

Rows of a reusing batch are laid out [padding, reused prefix, padding, new tokens]: every row's last
prompt token sits in the last column, as decoding expects, and the attention mask and position ids skip
the padding. The cache lives for one client round; it costs 2 x layers x key/value width x 4 bytes per
token (about 46 kB a token for SmolLM2-135M in float32).
Left out on purpose: eviction (a round's prompts are few) and sharing across rounds (the adapter changes).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from spearfl.scoring_lm import PADDING_ID, left_pad

LayerStates = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [heads, tokens, head dim]


class PrefixCache:
    """Per prompt (token ids), the key/value states of each layer."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, ...], LayerStates] = {}
        self.adding = True

    def store(self, prompts: list[list[int]], attention_mask: torch.Tensor, cache: DynamicCache) -> None:
        """Keep each row's states after a prefill: the positions its attention mask marks as real."""
        if not self.adding:
            return
        for row, prompt in enumerate(prompts):
            real = attention_mask[row].bool()
            self.entries[tuple(prompt)] = [(layer.keys[row][:, real], layer.values[row][:, real]) for layer in cache.layers]

    def longest_prefix(self, prompt: list[int]) -> tuple[int, LayerStates | None]:
        """(tokens reusable, states) for the stored prompt sharing the longest prefix; at least one token is left to run."""
        best, states = 0, None
        for key, entry in self.entries.items():
            shared = common_prefix_length(key, prompt, limit=len(prompt) - 1)
            if shared > best:
                best, states = shared, entry
        return best, states

    def retain(self, prompts: list[list[int]]) -> None:
        """Keep only the states of these prompts, and store no more (later prompts reuse, they do not add)."""
        wanted = {tuple(prompt) for prompt in prompts}
        self.entries = {key: entry for key, entry in self.entries.items() if key in wanted}
        self.adding = False

    @property
    def num_tokens(self) -> int:
        return sum(entry[0][0].shape[1] for entry in self.entries.values())


def common_prefix_length(left, right, limit: int) -> int:
    length = 0
    for a, b in zip(left, right):
        if a != b or length == limit:
            break
        length += 1
    return length


def prefill_reusing(
    model, prompts: list[list[int]], reused: list[tuple[int, LayerStates | None]], device
) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    """`scoring_lm.prefill` after the reused prefixes (`PrefixCache.longest_prefix` of each prompt, at least one
    nonempty): returns the attention mask [B, P + S], the last logits [B, V] and the cache."""
    prefix_length = max(length for length, _ in reused)
    cache = DynamicCache()
    first = next(states for length, states in reused if length)
    for layer, (keys, _) in enumerate(first):
        heads, _, width = keys.shape
        layer_keys = keys.new_zeros(len(prompts), heads, prefix_length, width)
        layer_values = keys.new_zeros(len(prompts), heads, prefix_length, width)
        for row, (length, states) in enumerate(reused):
            if length:
                layer_keys[row, :, prefix_length - length :] = states[layer][0][:, :length]
                layer_values[row, :, prefix_length - length :] = states[layer][1][:, :length]
        cache.update(layer_keys.to(device), layer_values.to(device), layer)
    prefix_mask = torch.zeros(len(prompts), prefix_length, dtype=torch.long)
    for row, (length, _) in enumerate(reused):
        prefix_mask[row, prefix_length - length :] = 1
    suffix_ids, suffix_mask = left_pad([prompt[length:] for prompt, (length, _) in zip(prompts, reused)], PADDING_ID)
    lengths = torch.tensor([length for length, _ in reused])
    position_ids = (lengths[:, None] + suffix_mask.cumsum(-1) - 1).clamp(min=0)
    attention_mask = torch.cat([prefix_mask, suffix_mask], dim=-1).to(device)
    logits = model(
        input_ids=suffix_ids.to(device),
        attention_mask=attention_mask,
        position_ids=position_ids.to(device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    return attention_mask, logits, cache
