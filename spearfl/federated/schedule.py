"""Client learning rate per round: linear warm-up, then cosine decay over the remaining rounds.

The SPEAR reference configs train with AdamW lr 5e-5, "warm-up then cosine decay over rounds";
the rate changes between rounds and stays fixed within a client's local steps.

Rounds are numbered 1..num_rounds (round 0 is the evaluation before any training).
- Warm-up, rounds 1..W: base_lr * r / W, so no round trains at rate 0 and round W reaches base_lr.
- Decay, rounds W+1..N: progress p = (r - W - 1) / (N - W) runs over [0, 1), and
  lr = min_lr + (base_lr - min_lr) * (1 + cos(pi p)) / 2 with min_lr = base_lr * min_lr_ratio.
  The first decay round trains at base_lr and the last one just above min_lr, so even with
  min_lr_ratio = 0 no round is wasted at rate 0.
"""

from __future__ import annotations

import math


def learning_rate(
    round_index: int, num_rounds: int | None, base_lr: float, warmup_rounds: int, min_lr_ratio: float
) -> float:
    """Learning rate for training round `round_index` (1-based) of `num_rounds`; None: rounds until stopped,
    base_lr after the warm-up (a cosine needs an end)."""
    if num_rounds is None:
        if round_index < 1 or warmup_rounds < 0:
            raise ValueError(f"round_index must be >= 1 and warmup_rounds >= 0, got {round_index}, {warmup_rounds}")
        return base_lr * min(1.0, round_index / warmup_rounds) if warmup_rounds else base_lr
    if not 1 <= round_index <= num_rounds:
        raise ValueError(f"round_index must be in 1..{num_rounds}, got {round_index}")
    if not 0 <= warmup_rounds <= num_rounds:
        raise ValueError(f"warmup_rounds must be in 0..{num_rounds}, got {warmup_rounds}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if round_index <= warmup_rounds:
        return base_lr * round_index / warmup_rounds
    progress = (round_index - warmup_rounds - 1) / (num_rounds - warmup_rounds)
    min_lr = base_lr * min_lr_ratio
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
