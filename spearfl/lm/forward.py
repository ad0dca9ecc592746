"""The forward passes every part of spearfl runs: training and scoring batches, prefill, option scoring.

Rows are prompt + completion, LEFT-padded, so that every completion ends in the last column: the
model then computes logits only for the last K positions (K = the longest completion in the batch)
instead of over the whole vocabulary at every prompt position. Position ids count real tokens only,
as in generation, so a token is scored at the position where it was sampled. Completions are token
ids (what `generate` returned, or an option's encoding), never re-tokenised text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from transformers import DynamicCache

from spearfl.lm.models import evaluation_mode
from spearfl.lm.prefix_cache import LayerStates, PrefixCache

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


MIN_SHARED_PREFIX = 8  # shorter common beginnings are not worth a second forward call


def completion_token_logits(model, batch: TokenBatch, num_positions: int | None = None) -> torch.Tensor:
    """Logits predicting each of the last K tokens, K = the longest completion (or `num_positions`).  -> [B, K, V]

    They line up with `batch.input_ids[:, -K:]` (targets) and `batch.completion_mask[:, -K:]`. When every row
    begins with the same tokens (a chat model's system turn), those run once and every row attends to them:
    the same logits, and through autograd the same gradients, for less work. Not while dropout is active
    (rows would share one dropout mask over those tokens) or activations are checkpointed (no cache then).
    """
    return _completion_outputs(model, batch, num_positions, logits=True)


def completion_hidden_states(model, batch: TokenBatch, num_positions: int | None = None) -> torch.Tensor:
    """The decoder's last hidden states at the positions `completion_token_logits` takes logits from.  -> [B, K, H]

    The output layer (`output_layer(model)`) turns them into those logits."""
    return _completion_outputs(model, batch, num_positions, logits=False)


def _completion_outputs(model, batch: TokenBatch, num_positions: int | None, logits: bool) -> torch.Tensor:
    if num_positions is None:
        num_positions = int(batch.completion_mask.sum(-1).max())
    predicting = predicting_positions(batch, num_positions)
    shared = training_shared_length(model, batch)
    if shared:
        return shared_prefix_outputs(model, batch, shared, predicting, logits)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids, "use_cache": False}
    if logits:
        return model(**inputs, logits_to_keep=predicting).logits
    return decoder(model)(**inputs).last_hidden_state[:, predicting]


def predicting_positions(batch: TokenBatch, num_positions: int) -> torch.Tensor:
    """The columns whose outputs predict the last `num_positions` tokens: position t predicts token t + 1, so the K
    positions before the last.  -> [K]"""
    length = batch.input_ids.shape[1]
    return torch.arange(length - num_positions - 1, length - 1, device=batch.input_ids.device)


def causal_lm(model):
    """The transformers causal LM inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model):
    """The decoder stack: what a causal LM runs before its output layer."""
    return causal_lm(model).get_decoder()


def output_layer(model) -> torch.nn.Module:
    """The layer that maps the decoder's last hidden states to logits (lm_head)."""
    return causal_lm(model).get_output_embeddings()


# Config attributes of architectures whose logits are not just the output layer of the last hidden state.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def plain_output_layer(model) -> bool:
    """Whether logits = output_layer(hidden) exactly, with a frozen, LoRA-free linear output layer: then log-probs
    can be taken from the hidden states in chunks of the vocabulary (`chunked_target_logprobs`)."""
    layer, config = output_layer(model), causal_lm(model).config
    return (
        type(layer) is torch.nn.Linear
        and not any(parameter.requires_grad for parameter in layer.parameters())
        and not any(getattr(config, name, None) for name in _LOGIT_TRANSFORMS)
    )


class _ChunkedTargetLogprobs(torch.autograd.Function):
    """log softmax(hidden W^T + b)[target] / T, a chunk of positions at a time, without keeping the logits.

    Forward keeps only each position's log-sum-exp; backward recomputes a chunk's logits to form its gradient
    (softmax - one-hot) x upstream, times W. The output layer is frozen, so it gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk: int):
        logprobs = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        normalisers = torch.empty_like(logprobs)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = at_least_float32(torch.nn.functional.linear(hidden[part], weight, bias)) / temperature  # [c, V]
            normalisers[part] = torch.logsumexp(logits, dim=-1)
            logprobs[part] = logits.gather(-1, targets[part, None]).squeeze(-1) - normalisers[part]
        ctx.save_for_backward(hidden, weight, bias, targets, normalisers)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logprobs

    @staticmethod
    def backward(ctx, upstream):
        hidden, weight, bias, targets, normalisers = ctx.saved_tensors
        gradient = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            logits = at_least_float32(torch.nn.functional.linear(hidden[part], weight, bias)) / ctx.temperature  # [c, V]
            scale = upstream[part, None] / ctx.temperature  # [c, 1]
            logit_gradient = torch.exp(logits.sub_(normalisers[part, None])).mul_(-scale)  # -softmax x upstream / T
            logit_gradient.scatter_add_(-1, targets[part, None], scale)
            gradient[part] = logit_gradient.to(weight.dtype) @ weight
        return gradient, None, None, None, None, None


def chunked_target_logprobs(
    hidden: torch.Tensor, layer: torch.nn.Linear, targets: torch.Tensor, temperature: float = 1.0, chunk: int = 64
) -> torch.Tensor:
    """Log-probability of each target under softmax(layer(hidden) / temperature), float32 or wider, with at most `chunk`
    positions' logits in memory at once (forward and backward).  hidden [P, H], targets [P] -> [P]"""
    return _ChunkedTargetLogprobs.apply(hidden, layer.weight, layer.bias, targets, temperature, chunk)


class _ChunkedDistillation(torch.autograd.Function):
    """Per position: log softmax(s)[target] and KL(softmax(t / T) || softmax(s / T)), with s = hidden W^T + b the
    student's logits and t = teacher_hidden W^T + b the teacher's (constants), a chunk of positions at a time.

    Forward keeps only the log-sum-exps; backward recomputes a chunk's two logits and forms the gradient on s,
    (one-hot - softmax(s)) x u_target + (softmax(s / T) - softmax(t / T)) x u_kl / T, times W. The output layer is
    frozen; the teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, bias, targets, temperature: float, chunk: int):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logprobs = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        kl = torch.empty_like(logprobs)
        normalisers = torch.empty(3, hidden.shape[0], dtype=dtype, device=hidden.device)  # s, s / T, t / T
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            student = at_least_float32(torch.nn.functional.linear(hidden[part], weight, bias))  # [c, V]
            normalisers[0, part] = torch.logsumexp(student, dim=-1)
            logprobs[part] = student.gather(-1, targets[part, None]).squeeze(-1) - normalisers[0, part]
            student = student.div_(temperature)
            normalisers[1, part] = torch.logsumexp(student, dim=-1)
            teacher = at_least_float32(torch.nn.functional.linear(teacher_hidden[part], weight, bias)).div_(temperature)
            normalisers[2, part] = torch.logsumexp(teacher, dim=-1)
            teacher_logprobs = teacher.sub_(normalisers[2, part, None])  # log softmax(t / T)
            gap = student.sub_(normalisers[1, part, None]).neg_().add_(teacher_logprobs)  # log p_t - log p_s
            kl[part] = (teacher_logprobs.exp_() * gap).sum(-1)
        ctx.save_for_backward(hidden, teacher_hidden, weight, bias, targets, normalisers)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logprobs, kl

    @staticmethod
    def backward(ctx, upstream_logprobs, upstream_kl):
        hidden, teacher_hidden, weight, bias, targets, normalisers = ctx.saved_tensors
        temperature = ctx.temperature
        gradient = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            student = at_least_float32(torch.nn.functional.linear(hidden[part], weight, bias))  # [c, V]
            tempered = (student / temperature).sub_(normalisers[1, part, None]).exp_()  # softmax(s / T)
            teacher = at_least_float32(torch.nn.functional.linear(teacher_hidden[part], weight, bias))
            teacher = teacher.div_(temperature).sub_(normalisers[2, part, None]).exp_()  # softmax(t / T)
            scale = upstream_logprobs[part, None]  # [c, 1]
            logit_gradient = tempered.sub_(teacher).mul_(upstream_kl[part, None] / temperature)
            logit_gradient.sub_(student.sub_(normalisers[0, part, None]).exp_().mul_(scale))  # - softmax(s) x u
            logit_gradient.scatter_add_(-1, targets[part, None], scale)
            gradient[part] = logit_gradient.to(weight.dtype) @ weight
        return gradient, None, None, None, None, None, None


def chunked_distillation(
    hidden: torch.Tensor, teacher_hidden: torch.Tensor, layer: torch.nn.Linear, targets: torch.Tensor, temperature: float, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probability of each target (temperature 1) and, at each position,
    KL(softmax(t / T) || softmax(s / T)) with s = layer(hidden), t = layer(teacher_hidden), float32 or wider, with
    at most `chunk` positions' logits in memory at once (forward and backward); gradients reach `hidden` only.
    hidden, teacher_hidden [P, H], targets [P] -> ([P], [P])"""
    return _ChunkedDistillation.apply(hidden, teacher_hidden.detach(), layer.weight, layer.bias, targets, temperature, chunk)


def shared_prefix_length(batch: TokenBatch) -> int:
    """Tokens every row begins with, stopping short of each row's last prompt token (it predicts the completion)."""
    lengths = batch.attention_mask.sum(-1)  # [B]
    starts = batch.input_ids.shape[1] - lengths  # [B] first real column of each row
    prompt_lengths = lengths - batch.completion_mask.sum(-1)  # [B]
    prompts = [row[start : start + length].tolist() for row, start, length in zip(batch.input_ids, starts, prompt_lengths)]
    return common_beginning(prompts)


def training_shared_length(model, batch: TokenBatch) -> int:
    """Tokens `completion_token_logits` runs once for all rows (0: none, each row runs whole)."""
    shared = shared_prefix_length(batch)
    return shared if shared >= MIN_SHARED_PREFIX and not stochastic_or_checkpointed(model) else 0


def stochastic_or_checkpointed(model) -> bool:
    """Whether a training forward has active dropout or checkpointed layers (which take no cache)."""
    return model.training and any(
        (isinstance(module, torch.nn.Dropout) and module.p > 0) or getattr(module, "gradient_checkpointing", False)
        for module in model.modules()
    )


def shared_prefix_outputs(model, batch: TokenBatch, shared: int, predicting: torch.Tensor, logits: bool = True) -> torch.Tensor:
    """`_completion_outputs` with the rows' first `shared` tokens run once, as one row, then repeated."""
    rows, length = batch.input_ids.shape
    starts = length - batch.attention_mask.sum(-1)  # [B]
    first = int(starts[0])
    cache = DynamicCache()
    decoder(model)(
        input_ids=batch.input_ids[:1, first : first + shared],
        position_ids=torch.arange(shared, device=starts.device)[None],
        cache=cache,
        use_cache=True,
    )
    cache.batch_repeat_interleave(rows)
    # The rest: every column from the earliest row's first unshared token, or from the first predicting
    # position if that comes earlier; a row's own shared tokens inside it are masked, they are in the cache.
    rest_start = min(int(starts.min()) + shared, int(predicting[0]))
    columns = torch.arange(rest_start, length, device=starts.device)  # [R]
    rest_mask = batch.attention_mask[:, rest_start:] * (columns[None] >= (starts + shared)[:, None])  # [B, R]
    inputs = {
        "input_ids": batch.input_ids[:, rest_start:],
        "attention_mask": torch.cat([rest_mask.new_ones(rows, shared), rest_mask], dim=-1),
        "position_ids": (columns[None] - starts[:, None]).clamp(min=0),
        "cache": cache,
        "use_cache": True,
    }
    if logits:
        return model(**inputs, logits_to_keep=predicting - rest_start).logits
    return decoder(model)(**inputs).last_hidden_state[:, predicting - rest_start]


@contextmanager
def decoder_layer_range(model, start: int, stop: int | None = None) -> Iterator[list[torch.nn.Module]]:
    """The decoder runs only its layers [start, stop) while this lasts, taking as input the hidden states entering
    layer `start` (`inputs_embeds`); yields those layers. Every layer receives the attention mask and position
    embeddings of the whole stack's forward, so a range continues the full forward exactly."""
    stack = decoder(model)
    layers, config = stack.layers, stack.config
    # a stack that looks each layer's attention type up by its place in the loop (Gemma 3) sees the range's own
    types = getattr(config, "layer_types", None)
    stack.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if types is not None:
        config.layer_types = list(types)[start:stop]
    try:
        yield list(stack.layers)
    finally:
        stack.layers = layers
        if types is not None:
            config.layer_types = types


def hidden_states_entering(model, batch: TokenBatch, stop: int, start: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden states entering decoder layer `stop` (no cache), from those entering layer `start` (`hidden`; None:
    the token embeddings, with `start` 0).  -> [B, T, H]"""
    if hidden is None:
        if start != 0:
            raise ValueError(f"hidden states entering layer {start} are needed to start there")
        hidden = decoder(model).embed_tokens(batch.input_ids)
    if stop == start:
        return hidden
    captured = []
    with decoder_layer_range(model, start, stop) as layers:
        handle = layers[-1].register_forward_hook(lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
        try:
            decoder(model)(inputs_embeds=hidden, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
        finally:
            handle.remove()
    return captured[0]


def completion_hidden_states_from(model, batch: TokenBatch, start: int, hidden: torch.Tensor | None, num_positions: int) -> torch.Tensor:
    """`completion_hidden_states` with decoder layers from `start` on only, from the hidden states entering it
    (`hidden`; None: from the token embeddings). Every row runs whole (no shared prefix).  -> [B, K, H]"""
    if hidden is None:
        hidden = hidden_states_entering(model, batch, 0)
    predicting = predicting_positions(batch, num_positions)
    with decoder_layer_range(model, start):
        outputs = decoder(model)(inputs_embeds=hidden, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False)
    return outputs.last_hidden_state[:, predicting]


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16 and float16 widened to float32; float32 and float64 as they are (a float64 model is the reference
    the tests measure float32 rounding against)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token, in float32 or wider.  logits [B, T, V], targets [B, T] -> [B, T]"""
    return torch.log_softmax(at_least_float32(logits), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def option_logprobs(
    model,
    prompts: list[list[int]],
    options: list[list[list[int]]],
    batch_size: int,
    prefixes: PrefixCache | None = None,
    end_ids: list[int] | None = None,
) -> list[list[float]]:
    """Total log-probability of each option's ids after its prompt: options[i][j] scored after prompts[i].

    end_ids: tokens that end the option there (a line break, EOS); when given, each option's score also
    counts the log-probability that one of them comes next, so an option that is only the beginning of a
    likelier one ("cat" of "catfish") does not win on the longer one's mass.
    Each prompt runs once; its key/value cache is copied to every option row, so an n-option question
    costs one prompt plus n short continuations instead of n full sequences. The prompts' states join
    `prefixes`, if given, for a later generation from the same prompts.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    totals: list[list[float] | None] = [None] * len(prompts)
    with evaluation_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            scores = score_options_batch(model, [prompts[i] for i in rows], [options[i] for i in rows], device, prefixes, end_ids)
            for index, row_scores in zip(rows, scores):
                totals[index] = row_scores
    return totals


def prefill(model, prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    """Run left-padded prompts once, keeping their key/value cache; a beginning all prompts share runs once.

    Returns the attention mask [B, P], the logits at each prompt's last position [B, V], and the cache.
    """
    shared = prefill_shared_length(prompts)
    if shared:
        cache = DynamicCache()
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), cache=cache, use_cache=True, logits_to_keep=1)
        states = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        return prefill_after(model, prompts, [(shared, states)] * len(prompts), device)
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


def prefill_shared_length(prompts: list[list[int]]) -> int:
    """Tokens `prefill` runs once for all prompts (0: none, each prompt runs whole)."""
    shared = common_beginning(prompts)
    return shared if len(prompts) > 1 and shared >= MIN_SHARED_PREFIX else 0


def common_beginning(prompts: list[list[int]]) -> int:
    """Tokens every prompt begins with, leaving each at least its last token to run."""
    limit = min(len(prompt) for prompt in prompts) - 1
    for position in range(limit):
        token = prompts[0][position]
        if any(prompt[position] != token for prompt in prompts):
            return position
    return max(limit, 0)


def prefill_after(
    model, prompts: list[list[int]], reused: list[tuple[int, LayerStates | None]], device,
    release_reused: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    """`prefill` after prefixes already run: `reused[i]` = (tokens of prompt i already run, their LayerStates),
    at least one nonempty. Returns the attention mask [B, P + S], the last logits [B, V] and the cache.

    Rows are laid out [padding, reused prefix, padding, new tokens]: every row's last prompt token sits in
    the last column, as decoding expects, and the attention mask and position ids skip the padding.
    Once the prefixes are copied into the cache, `reused` is emptied and release_reused (if given) called, before
    the new tokens run: states nothing else holds are freed before the prefill's own memory is taken.
    """
    lengths = torch.tensor([length for length, _ in reused])
    prefix_length = int(lengths.max())
    cache = DynamicCache()
    write_prefixes(cache, reused, prefix_length, device)
    reused.clear()
    if release_reused is not None:
        release_reused()
    prefix_mask = (torch.arange(prefix_length)[None, :] >= prefix_length - lengths[:, None]).long()  # [B, prefix]
    suffix_ids, suffix_mask = left_pad([prompt[length:] for prompt, length in zip(prompts, lengths.tolist())], PADDING_ID)
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


def write_prefixes(cache: DynamicCache, reused: list[tuple[int, LayerStates | None]], prefix_length: int, device) -> None:
    """Each row's reused states as the cache's first `prefix_length` tokens, right-aligned (padding first)."""
    first = next(states for length, states in reused if length)
    for layer, (like, _) in enumerate(first):
        heads, _, width = like.shape
        layer_keys = like.new_zeros(len(reused), heads, prefix_length, width)
        layer_values = like.new_zeros(len(reused), heads, prefix_length, width)
        for row, (length, states) in enumerate(reused):
            if length:
                layer_keys[row, :, prefix_length - length :] = states[layer][0][:, :length]
                layer_values[row, :, prefix_length - length :] = states[layer][1][:, :length]
        cache.update(layer_keys.to(device), layer_values.to(device), layer)


def score_options_batch(model, prompts, options, device, prefixes=None, end_ids=None) -> list[list[float]]:
    """One batch of `option_logprobs`: prompts left-padded, options right-padded after the cached prompts."""
    attention_mask, last_logits, cache = prefill(model, prompts, device)
    if prefixes is not None:
        prefixes.store(prompts, attention_mask, cache)
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
    sums = (token_logprobs(predicting, option_ids) * option_mask).sum(-1)  # [R]
    if end_ids is not None:
        after = logits[torch.arange(len(flat), device=device), option_mask.sum(-1) - 1]  # [R, V] predicts what follows
        sums = sums + torch.logsumexp(torch.log_softmax(after, dim=-1)[:, end_ids], dim=-1)  # [R]
    sums = sums.tolist()
    scores, row = [], 0
    for choices in options:
        scores.append(sums[row : row + len(choices)])
        row += len(choices)
    return scores
