"""Does torch.compile speed up the default model's prefill and decode on this machine? A one-off probe.

    .venv/bin/python scripts/compile_probe.py [THREADS]

Prefills 8 prompts of 70-91 tokens, then runs 12 greedy decode steps, eagerly and with
torch.compile(dynamic=True); prints the first call's time (compilation included) and three timed calls.
"""

import sys
import time

import torch

from spearfl.config import ModelConfig
from spearfl.lm.forward import prefill
from spearfl.lm.generation import decode_step
from spearfl.lm.models import load_base_model

STEPS = 12


def timed_call(model, prompts, device):
    with torch.inference_mode():
        started = time.perf_counter()
        mask, logits, cache = prefill(model, prompts, device)
        prefill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(STEPS):
            mask, logits = decode_step(model, logits.argmax(-1), mask, cache)
        step_seconds = (time.perf_counter() - started) / STEPS
    return prefill_seconds, step_seconds


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    device = torch.device("cpu")
    model, _ = load_base_model(ModelConfig(device="cpu"))
    prompts = [list(range(1000, 1000 + 70 + 3 * i)) for i in range(8)]
    for name, candidate in [("eager", model), ("compiled", torch.compile(model, dynamic=True))]:
        started = time.perf_counter()
        timed_call(candidate, prompts, device)
        first = time.perf_counter() - started
        calls = [timed_call(candidate, prompts, device) for _ in range(3)]
        print(
            f"{name}: first call {first:.1f} s; prefill s {[round(p, 3) for p, _ in calls]}; "
            f"decode step ms {[round(1000 * s) for _, s in calls]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
