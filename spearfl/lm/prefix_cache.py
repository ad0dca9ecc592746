"""Key/value states of prompts a client has already run, reused by later prompts that begin the same way.

A revision prompt begins with the tokens of its task prompt (the chat only grows: task, answer, feedback),
and every prompt of a chat model begins with the same system turn. `PrefixCache` keeps, for each prompt a
client round has prefilled, the keys and values of each layer; `spearfl.lm.forward.prefill_after` then runs only
the tokens after the longest stored common prefix. Keys and values of a token depend on the tokens before it alone,
so the result equals a full prefill (up to float rounding, as batching already allows).

The cache lives for one client round; it costs 2 x layers x key/value width x 4 bytes per
token (about 46 kB a token for SmolLM2-135M in float32: 128 prompts of 150 tokens would hold 880 MB). So it holds
at most `max_bytes`: a prompt that does not fit is not stored, and a later prompt that begins with it runs its
prefill whole, which gives the same states.
Left out on purpose: eviction (the first prompts stored stay) and sharing across rounds (the adapter changes).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

LayerStates = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [heads, tokens, head dim]


class PrefixCache:
    """Per prompt (token ids), the key/value states of each layer."""

    def __init__(self, max_bytes: float | None = None) -> None:
        self.entries: dict[tuple[int, ...], LayerStates] = {}
        self.adding = True
        self.max_bytes = max_bytes  # None: no bound
        self.num_bytes = 0
        self.forget_after_use = False  # the states' last use: a prefill that reuses an entry drops it (`forget`)

    def store(self, prompts: list[list[int]], attention_mask: torch.Tensor, cache: DynamicCache) -> None:
        """Keep each row's states after a prefill: the positions its attention mask marks as real."""
        if not self.adding:
            return
        for row, prompt in enumerate(prompts):
            key = tuple(prompt)
            real = attention_mask[row].bool()
            tokens = int(real.sum())
            size = sum(2 * tokens * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size() for layer in cache.layers)
            if key in self.entries or (self.max_bytes is not None and self.num_bytes + size > self.max_bytes):
                continue
            self.entries[key] = [(layer.keys[row][:, real], layer.values[row][:, real]) for layer in cache.layers]
            self.num_bytes += size

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
        self._keep(lambda key: key in wanted)
        self.adding = False

    def forget(self, prompts: list[list[int]]) -> None:
        """Drop the stored prompts these prompts begin with: a batch's cache holds copies of their states now."""
        self._keep(lambda key: not any(tuple(prompt[: len(key)]) == key for prompt in prompts))

    def _keep(self, wanted) -> None:
        self.entries = {key: entry for key, entry in self.entries.items() if wanted(key)}
        self.num_bytes = sum(2 * keys.nelement() * keys.element_size() for entry in self.entries.values() for keys, _ in entry)

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
