"""One client round of an algorithm on a config, with its seconds and peak resident memory by phase.

    PYTHONPATH=CHECKOUT python scripts/round_memory.py CONFIG.yaml [ALGORITHM] [ROUND]

Reads only the client-round API every version of spearfl has (`ALGORITHMS`, `ClientRound`, the Sampler), so it
measures an older checkout the same way as this one: a thread samples the process's resident memory every 10 ms
and files it under the phase the round is in (generation: sampling and judging; training: the optimizer steps).
Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import spearfl.algorithms.base as base
from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientRound
from spearfl.config import load_config
from spearfl.lm.models import get_adapter_state
from spearfl.runtime.setup import build_context, prepare_data


def resident_mb() -> float:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) / 1024 for line in file if line.startswith("VmRSS:"))


def main() -> None:
    config_path, algorithm = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "spear"
    round_index = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    phase, peaks, seconds = ["load"], {}, {}

    def sample():
        while True:
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), resident_mb())
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    config = load_config(config_path, [])
    context = build_context(config)
    examples = prepare_data(config).clients[0]
    phase[0] = "loaded"
    time.sleep(0.05)

    def in_phase(name, function):
        def wrapped(*args, **kwargs):
            before = phase[0]
            phase[0] = name
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
                phase[0] = before if name == "generation" else "after"

        return wrapped

    base.Sampler.__call__ = in_phase("generation", base.Sampler.__call__)
    module = sys.modules[ALGORITHMS[algorithm].__module__]
    module.train = in_phase("training", module.train)
    work = ClientRound(0, round_index, examples, get_adapter_state(context.model), config.optimizer.lr, config.seed)
    phase[0] = "round"
    started = time.perf_counter()
    result = ALGORITHMS[algorithm](context, work)
    round_seconds = time.perf_counter() - started
    time.sleep(0.05)
    keep = ("wins", "losses", "trained_tokens", "micro_batch_rows", "checkpointed_steps", "planned_working_mb", "working_memory_mb")
    print(json.dumps({
        "config": str(config_path), "algorithm": algorithm, "round": round_index, "round_seconds": round(round_seconds, 2),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "peak_mb": {name: round(value) for name, value in peaks.items()},
        "metrics": {key: result.metrics[key] for key in keep if key in result.metrics},
    }))


if __name__ == "__main__":
    main()
