"""A client's memory budget: what a training step keeps, measured on the model itself, and the plan that fits
every step of a round under the budget (`client.memory_budget_mb`).

A training step's memory beyond the weights is dominated by the activations its forward keeps for the backward
pass: per token, every intermediate of every decoder layer the backward goes through (with LoRA dropout on all
seven projections of SmolLM2-135M, about 72 kB a token and layer in float32, 2.2 MB a token over 30 layers).
Three levers bound it, and `plan_step` pulls them in this order, stopping at the first plan whose estimate fits:

1. the vocabulary: the log-probability of a completion token is taken from the last hidden state a chunk of
   positions at a time (`spearfl.lm.forward.chunked_target_logprobs`), so no [rows, K, V] logits exist;
2. micro-batches: the step's rows go through forward and backward a few at a time and their gradients
   accumulate; every loss is a sum over rows divided by counts of the whole step's batch, so the step's
   gradient is the one-batch gradient (up to float32 rounding; dropout masks are drawn per micro-batch);
3. activation checkpointing of whole decoder layers (`spearfl.lm.models.checkpoint_lora_layers`): only each
   layer's input is kept and one layer at a time is recomputed in the backward pass, for a second forward.
   Micro-batches come first because on a CPU a few hundred tokens already fill the matmuls, while checkpointing
   always costs that second forward.

The estimate of a micro-batch (`step_bytes`) is what its forward keeps, one layer's intermediates and gradients in
flight, and the vocabulary's tensors. What a forward keeps is measured once per model (`measure_activation_costs`):
a short probe row runs a training forward while a saved-tensor hook counts the bytes autograd keeps, by layer.
The budget covers the whole process: the plan's working memory is the budget less what the process holds when
training starts (after the round's generation, with freed memory handed back) and the optimizer state to come.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from spearfl.lm.allocator import CAN_RELEASE, release_free_memory
from spearfl.lm.forward import TokenBatch, causal_lm, completion_hidden_states
from spearfl.lm.models import checkpoint_lora_layers, decoder_layers

MB = 2**20
# The working memory of a round when no budget is set: the paper setting's round peaks at 1.5 GB at 32 prompts and
# 1.6 GB at 128 (docs/performance.md), and its micro-batches of 4 checkpointed rows train as fast as 8 would
# (68.8 s against 69.1 s). The demo's SPEAR round peaks 1.40x above its weights, adapter and optimizer state (the bench).
DEFAULT_WORKING_MB = 192
VOCABULARY_CHUNK = 64  # completion tokens whose logits exist at once: 12 MB of float32 logits over 49,152 tokens
MIN_MICRO_BATCH_TOKENS = 256  # below this a micro-batch's matmuls run far under the machine's rate: checkpoint instead
PROBE_TOKENS = 32


@dataclass(frozen=True)
class ActivationCosts:
    """Bytes a training forward of this model keeps for its backward pass, per token (from `measure_activation_costs`)."""

    kept_per_token: float  # every layer the backward goes through, no checkpointing
    layer_per_token: float  # the largest single layer
    boundary_per_token: float  # with checkpointing: each of those layers' input
    vocabulary: int
    hidden_bytes: int  # one token's last hidden state

    def step_bytes(self, rows: int, length: int, positions: int, checkpoint: bool, vocabulary_chunk: int, logit_tensors: int) -> float:
        """Estimated working memory of one micro-batch: `rows` rows padded to `length` tokens, `positions` completion
        tokens scored, `logit_tensors` float32 [rows, positions, V] tensors held at once when the vocabulary is not
        chunked (`vocabulary_chunk` 0)."""
        tokens = rows * length
        kept = tokens * (self.boundary_per_token + self.layer_per_token) if checkpoint else tokens * self.kept_per_token
        in_flight = tokens * self.layer_per_token  # a layer's intermediates and gradients during the backward pass
        if vocabulary_chunk:
            vocabulary = min(vocabulary_chunk, positions) * self.vocabulary * 4 * 3 + positions * self.hidden_bytes
        else:
            vocabulary = positions * self.vocabulary * 4 * logit_tensors
        return kept + in_flight + vocabulary


_measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def measure_activation_costs(model) -> ActivationCosts:
    """Run one probe row through a training forward (dropout on, checkpointing off, the random state untouched)
    and count the bytes autograd keeps for the backward pass, by decoder layer. Measured once per model."""
    base = causal_lm(model)
    if base in _measured:
        return _measured[base]
    layers = decoder_layers(model)
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    kept: dict[int, dict[int, int]] = {}  # layer -> storage -> bytes
    current = [-1]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept.setdefault(current[0], {})[storage.data_ptr()] = storage.nbytes()
        return tensor

    # what the final norm keeps counts to the last layer's
    hooks = [layer.register_forward_pre_hook(lambda module, args, index=index: current.__setitem__(0, index)) for index, layer in enumerate(layers)]
    device = next(model.parameters()).device
    ids = torch.arange(1, PROBE_TOKENS + 1, device=device)[None] % base.config.vocab_size
    probe = TokenBatch(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool), torch.arange(PROBE_TOKENS, device=device)[None])
    probe.completion_mask[:, -1] = True
    try:
        with layer_checkpointing(model, False), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            was_training = model.training
            model.train()
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    completion_hidden_states(model, probe, 1)
            finally:
                model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = {layer: sum(storages.values()) / PROBE_TOKENS for layer, storages in kept.items() if layer >= 0}
    element = next(model.parameters()).element_size()
    hidden = base.config.hidden_size * element
    costs = ActivationCosts(
        kept_per_token=sum(sum(storages.values()) for storages in kept.values()) / PROBE_TOKENS,
        layer_per_token=max(per_layer.values(), default=0.0),
        boundary_per_token=hidden * len(per_layer),
        vocabulary=base.config.vocab_size,
        hidden_bytes=hidden,
    )
    _measured[base] = costs
    return costs


@contextmanager
def layer_checkpointing(model, enabled: bool, ceiling_mb: float | None = None):
    """Turn checkpointing of the decoder layers the backward goes through on or off, and back as it was.

    ceiling_mb: under checkpointing, hand freed memory back after a layer (forward and backward) whenever the
    process holds more than this; None: after every layer."""
    layers = decoder_layers(model)
    before = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    checkpoint_lora_layers(model, enabled)
    hooks = []
    if enabled and CAN_RELEASE:
        # A checkpointed forward frees each layer's intermediates at once, but the small objects autograd keeps
        # until the backward settle in the freed blocks, so glibc cannot reuse them for the next layer and the
        # heap grows by a layer's intermediates per layer (measured: 1.15 GB held for 0.25 GB in use). Handing
        # the freed pages back keeps the process at what it uses; only above the ceiling, since every page handed
        # back faults in again when the next layer allocates it (after every layer: training 1.35x slower).
        release = _ReleaseAfterLayer(ceiling_mb)
        for layer in layers:
            if getattr(layer, "gradient_checkpointing", False):
                hooks.append(layer.register_forward_hook(release))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer, state in zip(layers, before):
            layer.gradient_checkpointing = state


class _ReleaseAfterLayer:
    """Forward hook: hand freed memory back now, and again when the backward pass reaches this layer's output,
    each time only if the process holds more than `ceiling_mb` (None: always)."""

    def __init__(self, ceiling_mb: float | None) -> None:
        self.ceiling_mb = ceiling_mb

    def release(self, *unused) -> None:
        if self.ceiling_mb is None or resident_mb() > self.ceiling_mb:
            release_free_memory()

    def __call__(self, module, inputs, output) -> None:
        self.release()
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self.release)


@dataclass(frozen=True)
class StepPlan:
    """How one optimizer step runs its rows: in micro-batches of `micro_batch_rows`, with or without checkpointing,
    with the vocabulary in chunks of `vocabulary_chunk` completion tokens (0: whole logits)."""

    micro_batch_rows: int
    checkpoint: bool
    vocabulary_chunk: int
    estimated_mb: float  # working memory of its largest micro-batch
    fits: bool  # False: even the smallest plan exceeds the working memory; it runs anyway


def micro_batches(lengths: list[int], rows: int) -> list[list[int]]:
    """Row indices of each micro-batch: rows sorted by length and cut into groups of `rows`, so rows of a
    micro-batch are alike in length and pad little; all rows in their order when they fit in one."""
    if rows >= len(lengths):
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    return [order[start : start + rows] for start in range(0, len(order), rows)]


def plan_step(
    costs: ActivationCosts,
    lengths: list[int],
    positions: int,
    working_mb: float,
    chunkable: bool = True,
    logit_tensors: int = 4,
    force_checkpoint: bool = False,
) -> StepPlan:
    """The fastest plan for a step whose rows have `lengths` tokens (K = `positions` completion tokens each at most)
    whose estimate fits in `working_mb`: whole batch first, then micro-batches halving down to MIN_MICRO_BATCH_TOKENS
    tokens, then the same with checkpointing, down to one row. `chunkable`: the loss needs only target log-probs."""
    chunk, longest = (VOCABULARY_CHUNK if chunkable else 0), max(lengths)
    candidates = []
    for checkpoint in ((True,) if force_checkpoint else (False, True)):
        rows = len(lengths)
        while True:
            candidates.append((rows, checkpoint))
            if rows == 1 or (not checkpoint and (rows + 1) // 2 * longest < MIN_MICRO_BATCH_TOKENS):
                break
            rows = (rows + 1) // 2
    plan = None
    for rows, checkpoint in candidates:
        estimate = costs.step_bytes(rows, longest, rows * positions, checkpoint, chunk, logit_tensors) / MB
        plan = StepPlan(rows, checkpoint, chunk, estimate, estimate <= working_mb)
        if plan.fits:
            return plan
    return plan


def resident_mb() -> float:
    """The process's resident memory now, MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def working_memory_mb(budget_mb: float | None, model, device: torch.device) -> float:
    """The working memory a round's training steps may plan for: the budget less what the process holds now and the
    optimizer state and gradients still to come (three copies of the adapter); without a budget, DEFAULT_WORKING_MB.
    On a GPU the process's holdings are the device's allocated memory."""
    if budget_mb is None:
        return DEFAULT_WORKING_MB
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    held = torch.cuda.memory_allocated(device) / MB if device.type == "cuda" else resident_mb()
    return budget_mb - held - 3 * adapter / MB


def prefix_cache_bytes(working_mb: float) -> float:
    """What a round's prefix cache (`spearfl.lm.prefix_cache`) may hold: the working memory, which generation
    otherwise leaves to the batch in flight (its key/value cache). Half of it cost the paper setting's round 4-6 s
    of generation (prompts whose revisions ran their prefill whole) for no lower peak."""
    return working_mb * MB


def generation_cache_bytes(working_mb: float) -> float:
    """The most a generation batch's key/value cache may hold at its final length: half the working memory. The
    other half is for the prefill's passing activations and the allocator's copies of a cache that grows a token a
    step. Fewer rows cost little where answers are short and a batch's time is mostly its prefill: the paper
    setting's generation took 16.6 s in batches of 8 against 17.4 s in batches of 16 in one process, and 13.5 s
    against 12.5 s in separate ones (docs/performance.md)."""
    return working_mb * MB / 2


def kv_cache_bytes_per_token(model) -> int:
    """Bytes one token's keys and values take over all layers, from the model's configuration."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    element = model.get_input_embeddings().weight.element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def generation_rows(batch_size: int, tokens: int, bytes_per_token: int, cache_bytes: float | None) -> int:
    """Rows of a generation batch whose rows reach `tokens` tokens: `batch_size`, halved while its key/value cache
    (rows x tokens x bytes_per_token) would pass `cache_bytes`; at least one row."""
    rows = batch_size
    while cache_bytes is not None and rows > 1 and rows * tokens * bytes_per_token > cache_bytes:
        rows = (rows + 1) // 2
    return rows
