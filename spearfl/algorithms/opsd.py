"""OPSD client update: on-policy self-distillation from a privileged copy of the model itself.

After "Self-Distilled Reasoner: On-Policy Self-Distillation for Large Language Models" (Zhao, Xie, Liu,
Huang, Pang, Chen, Grover, 2026, arXiv 2601.18734): one model plays two roles. The student sees only the
task prompt and samples its own completions; the teacher is the same model given privileged context
(here the gold answer, and the worked solution and facts when the example has them: `opsd.privileged`),
and the student is trained to match the teacher's next-token distribution on the student's own samples.
The loss is a divergence between the two distributions over the full vocabulary at every completion token,
averaged over the completion tokens of a batch. By default (`opsd.divergence: forward_kl`) it is
KL(teacher || student): the teacher's distribution is the target, mode-covering, as SPEAR.md defines the
baseline. The OPSD paper trains with the generalised Jensen-Shannon divergence of GKD instead
(beta 0.5 in its public implementations); `opsd.divergence: jsd` selects it, with `opsd.jsd_beta`, and
`reverse_kl` gives KL(student || teacher) (spearfl.losses.distill).

The teacher is FROZEN at round start: base + the round-start global adapter. Its log-probabilities for
every sample are computed once, before any update, and kept; training never recomputes them (the
reference let the teacher drift with the student). They are kept in host memory as float16, full
vocabulary, one [completion length, V] tensor per sample: half the memory of float32 (6 MB instead of
12 for 64 tokens over SmolLM2's 49152-token vocabulary), and rounding moves a log-probability above
-16 by at most 0.004 nats.

Needs ground truth in the client's training context, which SPEAR does not: an upper-bound style
baseline. The verdicts of the feedback provider serve only the online accuracy metric.
Left out on purpose: revisions (no feedback text reaches the model) and several samples per prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from spearfl.algorithms.base import (
    ClientContext,
    ClientResult,
    ClientRound,
    Collected,
    Sampler,
    Trainer,
    client_round,
    draw,
    train_steps,
)
from spearfl.lm.models import evaluation_mode
from spearfl.lm.training import MicroBatch, collate, completion_logits
from spearfl.losses.distill import distillation_loss

TEACHER_DTYPE = torch.float16  # the module docstring says why half precision suffices


@dataclass
class Sample:
    """A student completion under the task prompt, with the frozen teacher's log-probs for each of its tokens."""

    prompt: list[int]
    completion: list[int]
    teacher_logprobs: torch.Tensor  # [len(completion), V] TEACHER_DTYPE on the CPU


@torch.no_grad()
def teacher_logprobs(
    context: ClientContext, prompts: list[list[int]], completions: list[list[int]]
) -> tuple[list[torch.Tensor], int]:
    """Full-vocabulary log-probs of the model as it is now, at each completion token, without dropout.

    Returns one [len(completion), V] TEACHER_DTYPE CPU tensor per (prompt, completion) pair, in input
    order, and the tokens the forward passes processed (padding excluded).
    """
    batch_size, pad_id = context.config.opsd.batch_size, context.prompts.tokenizer.pad_token_id
    rows, num_tokens = [], 0
    with evaluation_mode(context.model):
        for start in range(0, len(prompts), batch_size):
            chunk = completions[start : start + batch_size]
            batch = collate(prompts[start : start + batch_size], chunk, pad_id, context.device)
            logprobs = torch.log_softmax(completion_logits(context.model, batch).float(), dim=-1)  # [B, K, V]
            rows += [logprobs[row, -len(ids):].to("cpu", TEACHER_DTYPE) for row, ids in enumerate(chunk)]
            num_tokens += batch.num_tokens
    return rows, num_tokens


def opsd_step(context: ClientContext, trainer: Trainer, samples: list[Sample]) -> tuple[float, dict]:
    """Accumulate the gradient of opsd.divergence between the frozen teacher and the student, averaged over the
    completion tokens of the step's samples; returns it and the tokens the forward processed."""
    settings, pad_id = context.config.opsd, context.prompts.tokenizer.pad_token_id
    batch = collate([s.prompt for s in samples], [s.completion for s in samples], pad_id, context.device)
    tokens = int(batch.completion_mask.sum())

    def contribution(micro: MicroBatch) -> tuple[torch.Tensor, dict]:
        student_logits = micro.logits()  # [b, K, V]
        # Positions before a short completion hold a uniform distribution: a valid one, masked out of the loss anyway.
        uniform = -math.log(student_logits.shape[-1])
        rows = [samples[int(row)].teacher_logprobs for row in micro.rows]
        teacher = micro.batch.right_aligned(rows, fill=uniform, dtype=torch.float32)  # [b, K, V]
        mask = micro.batch.completion_mask
        loss = distillation_loss(teacher, student_logits, mask, settings.divergence, settings.jsd_beta, tokens)
        return loss, {"trained_tokens": micro.batch.num_tokens}

    # held at once: teacher and student log-probs, the divergence's intermediates and their gradients
    return trainer(batch, contribution, logits=True, logit_tensors=8)


def train(context: ClientContext, work: ClientRound, samples: list[Sample]) -> dict:
    """S optimizer steps, each on B samples drawn at random; returns training metrics."""
    settings = context.config.opsd

    def step_gradient(rng, step, trainer):
        return opsd_step(context, trainer, draw(samples, settings.batch_size, rng))

    return train_steps(context, work, context.config.budget("opsd").local_steps, step_gradient)


def collect_samples(context: ClientContext, work: ClientRound, sample: Sampler, examples, prompts) -> Collected:
    """Sample one completion per task prompt, judge it, and score it with the teacher before any update.

    Weight = number of prompts trained on: every sampled prompt. Each sample is a learning signal, as each
    SPEAR win is, whether or not a random batch happens to draw it.
    """
    completions, feedback = sample(prompts, examples, "first-attempt", "samples")
    teacher_started = time.perf_counter()
    generated = [completion.token_ids for completion in completions]
    privileged = [context.prompts.privileged(example, context.config.opsd.privileged) for example in examples]
    teacher, teacher_tokens = teacher_logprobs(context, privileged, generated)
    samples = [Sample(prompt, completion, row) for prompt, completion, row in zip(prompts, generated, teacher)]
    metrics = {
        "first_try_correct": sum(f.correct for f in feedback),
        "scored_tokens": teacher_tokens,
        "teacher_seconds": time.perf_counter() - teacher_started,
    }
    return Collected(samples, float(len(samples)), metrics)


def client_update(context: ClientContext, work: ClientRound) -> ClientResult:
    """One OPSD round on one client; the teacher is scored while collecting, frozen from then on.

    Prompts and samples take SPEAR's seed purposes, so both methods draw the same prompts and, from the
    same adapter, the same first attempts.
    """
    return client_round(context, work, context.config.budget("opsd").prompts_per_round, collect_samples, train)
