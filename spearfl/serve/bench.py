"""`spearfl serve-bench`: the device service under load, measured on the machine it runs on.

A service with the config's model starts on 127.0.0.1 (in this process, its store in a temporary folder), and:
- for each concurrency c, c simulated people ask `requests` held-out questions each, judging every answer (no
  revisions): time to first token and tokens per second per request (completion tokens over the request's
  time), median and p95, and the service's total decode rate; once with the engine batching concurrent
  requests and once decoding one request at a time, so the batching's gain is measured, not assumed;
- store writes per second: interactions added and judged from 4 threads on one file;
- the time from a round's end to the service answering with the new adapter: the server's /worker/result
  notice with a new adapter, until an answer reports the new version.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import httpx

from spearfl.config import RunConfig
from spearfl.data.store import Attempt, InteractionStore
from spearfl.runtime.setup import build_context, client_feedback, prepare_data
from spearfl.runtime.worker import exchange
from spearfl.serve.device import ServiceThread, build_service
from spearfl.serve.simulate import deal, simulate_people


def load_figures(config: RunConfig, context, concurrency: int, requests: int, max_batch: int, folder: Path) -> dict:
    """c people asking at once against a fresh service: per-request latency and rate, and the total decode rate."""
    store_config = config.model_copy(update={"live": config.live.model_copy(update={"store": str(folder / f"load-{concurrency}-{max_batch}.sqlite")})})
    served = ServiceThread(build_service(store_config, context=context, max_batch=max_batch))
    try:
        questions = deal(prepare_data(config).heldout, concurrency, concurrency * requests, seed=concurrency)
        started = time.perf_counter()
        tally = simulate_people(f"http://{served.address}", questions, client_feedback(config), revisions=0)
        wall = time.perf_counter() - started
    finally:
        served.stop()
    summary = tally.summary()
    figures = {key: summary[key] for key in ("first_token_s_median", "first_token_s_p95", "tokens_per_s_median", "tokens_per_s_p95")}
    return figures | {
        "concurrency": concurrency, "max_batch": max_batch, "requests": len(tally.total_seconds), "errors": len(tally.errors),
        "total_tokens_per_s": sum(tally.tokens) / wall,
    }


def store_writes_per_second(folder: Path, seconds: float = 3.0, writers: int = 4) -> float:
    """Interactions added and judged (two transactions each) per second, `writers` threads on one file."""
    store = InteractionStore(folder / "writes.sqlite")
    attempt = Attempt(list(range(120)), "Answer: something", list(range(12)), 0, "stop")
    counts = [0] * writers
    deadline = time.perf_counter() + seconds

    def write(index: int) -> None:
        while time.perf_counter() < deadline:
            store.judge(store.add("a question of some length?", attempt), 0, True)
            counts[index] += 1

    threads = [threading.Thread(target=write, args=(index,)) for index in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    store.close()
    return sum(counts) / elapsed


def adapter_switch_seconds(config: RunConfig, context, folder: Path, repeats: int = 3) -> list[float]:
    """From the round-end notice carrying a new adapter to the first answer written by it."""
    store_config = config.model_copy(update={"live": config.live.model_copy(update={"store": str(folder / "switch.sqlite")})})
    served = ServiceThread(build_service(store_config, context=context))
    example = prepare_data(config).heldout[0]
    timings = []
    try:
        state = served.service.engine.adapter_state()
        arrays = {name: tensor.numpy() for name, tensor in state.items()}
        with httpx.Client(base_url=f"http://{served.address}", timeout=600) as client:
            for version in range(1, repeats + 1):
                started = time.perf_counter()
                exchange(served.address, "/worker/result", arrays, {"round": version, "accepted": None, "version": version}, timeout=600)
                body = {"question": example.question, "options": list(example.options) or None}
                with client.stream("POST", "/ask", json=body) as response:
                    done = [line for line in response.iter_lines() if line.startswith("data: ")][-1]
                timings.append(time.perf_counter() - started)
                assert f'"adapter_version": {version}' in done, done
    finally:
        served.stop()
    return timings


def serve_bench(config: RunConfig, concurrencies: list[int], requests: int) -> dict:
    context = build_context(config)
    with tempfile.TemporaryDirectory(prefix="spearfl-serve-bench-") as name:
        folder = Path(name)
        load = [
            load_figures(config, context, c, requests, max_batch, folder)
            for c in concurrencies for max_batch in ((16, 1) if c > 1 else (16,))
        ]
        writes = store_writes_per_second(folder)
        switch = adapter_switch_seconds(config, context, folder)
    return {"load": load, "store_writes_per_s": writes, "adapter_switch_s": switch}
