"""`spearfl bench`: where a client round's time and memory go on this machine, against its own ceiling.

Measured in one run, with the threads spearfl uses:
- the ceiling: dense matmul FLOP/s (float32, and bfloat16, which this CPU may run far slower);
- the configured model: prefill, decode at several batch sizes, and LoRA training (forward + backward),
  as tokens/s and as a fraction of the ceiling (model FLOP utilisation);
- one SPEAR client round split into generation, feedback, training and adapter packing, with its peak
  resident memory; the same prompts through a GRPO round (G = 4), and the SPEAR / GRPO ratios;
- the bytes a client uploads per round with each upload encoding;
- a device holding two adapters (personalization, TAP): the same prompts through a TAP round (the global update,
  stage 1's replacement on the client's validation split, the personal adapter's pass) and TAP's stage 2 (the
  personal adapter distilled from the global one), each with its peak resident memory.

Model FLOPs are given two ways. `mfu` follows the usual convention: 2 x N FLOPs a token forward, 6 x N a
token for training, N = all parameters. `counted_fraction` counts the matmuls that actually run: the
decoder's linear layers, the vocabulary projection only where logits are computed, LoRA's factors, and
for training a backward pass that computes input gradients only down to the lowest LoRA layer and weight
gradients only for LoRA (the base model is frozen, so the convention's 6 x N overstates the work).
Both count a beginning every row shares (a chat model's system turn) once, as it runs; tokens/s counts
every row's tokens. Attention's score and value products (a few % at these lengths) are left out of both.
Every figure is the median over repeats, with the lowest and highest; ratios pair repeats of one run.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import (
    ClientContext,
    ClientRound,
)
from spearfl.config import RunConfig
from spearfl.errors import UserError
from spearfl.federated.codec import (
    UPLOAD_ENCODINGS,
    encode_upload,
    payload_bytes,
    wire_array,
)
from spearfl.lm.forward import prefill, prefill_shared_length, training_shared_length
from spearfl.lm.generation import decode_step
from spearfl.lm.models import get_adapter_state, lora_parameters, set_adapter_state
from spearfl.lm.training import collate, target_logprobs
from spearfl.losses.spear import likelihood_loss
from spearfl.personal import PersonalClient
from spearfl.personal.tap import Tap
from spearfl.runtime.client import run_personal_client


def spread(values: list[float]) -> dict:
    """Median, lowest and highest of repeated measurements."""
    return {"median": statistics.median(values), "low": min(values), "high": max(values), "repeats": len(values)}


def timed(action: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of `action`, after `warmup` untimed calls."""
    for _ in range(warmup):
        action()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return seconds


def per_second(amount: float, seconds: list[float]) -> dict:
    return spread([amount / s for s in seconds])


# ------------------------------------------------------------------------------------------- the machine


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def matmul_ceiling(dtype: torch.dtype, size: int, repeats: int, device: torch.device) -> dict:
    """FLOP/s of a dense [size, size] x [size, size] matmul (2 size^3 FLOPs)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    right = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)

    def multiply():
        product = left @ right
        if device.type == "cuda":
            torch.cuda.synchronize()
        return product

    return {"dtype": str(dtype).removeprefix("torch."), "size": size, "flops_per_s": per_second(2 * size**3, timed(multiply, repeats))}


# ------------------------------------------------------------------------------------------- model FLOPs

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelFlops:
    """Parameter counts that set the FLOPs of a token."""

    all_parameters: int  # N of the convention, LoRA excluded
    decoder_linear: int  # weights of the decoder layers' linear projections
    decoder_linear_from_lowest_lora: int  # ... of the layers from the lowest LoRA layer up
    vocabulary_projection: int  # lm_head weights
    lora: int  # LoRA factors

    def forward(self, tokens: int, logit_positions: int) -> float:
        return 2 * (self.decoder_linear + self.lora) * tokens + 2 * self.vocabulary_projection * logit_positions

    def training(self, tokens: int, logit_positions: int) -> float:
        """Forward, input gradients down to the lowest LoRA layer, weight gradients for LoRA only."""
        backward = 2 * self.decoder_linear_from_lowest_lora * tokens + 4 * self.lora * tokens
        return self.forward(tokens, logit_positions) + backward + 2 * self.vocabulary_projection * logit_positions


def count_model_flops(peft_model) -> ModelFlops:
    adapter = lora_parameters(peft_model)
    lora_names, lora = set(adapter), sum(p.numel() for p in adapter.values())
    per_layer: dict[int, int] = {}
    projection = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lora_" in name:
            continue
        match = _LAYER.search(name)
        if match:
            per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + module.weight.numel()
        elif name.endswith("lm_head"):
            projection += module.weight.numel()
    lora_layers = [int(m.group(1)) for m in map(_LAYER.search, lora_names) if m]
    lowest = min(lora_layers, default=len(per_layer))
    base = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" not in name)
    return ModelFlops(
        all_parameters=base,
        decoder_linear=sum(per_layer.values()),
        decoder_linear_from_lowest_lora=sum(count for layer, count in per_layer.items() if layer >= lowest),
        vocabulary_projection=projection,
        lora=lora,
    )


def utilisation(tokens_per_s: dict, flops_per_token: float, convention_per_token: float, ceiling: float) -> dict:
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s["median"] * convention_per_token / ceiling,
        "counted_fraction": tokens_per_s["median"] * flops_per_token / ceiling,
    }


# ------------------------------------------------------------------------------------------- model throughput


def measure_prefill(context: ClientContext, prompts: list[list[int]], flops: ModelFlops, ceiling: float, repeats: int) -> dict:
    """Prompts through the model once, keeping the cache and the last position's logits (as generation does).

    tokens/s counts prompt tokens; the FLOP fractions count only the tokens that run (a beginning every
    prompt shares runs once)."""
    model, tokens = context.model, sum(len(p) for p in prompts)
    tokens_run = tokens - (len(prompts) - 1) * prefill_shared_length(prompts)
    with torch.inference_mode():
        seconds = timed(lambda: prefill(model, prompts, context.device), repeats)
    run_share = tokens_run / tokens
    result = utilisation(
        per_second(tokens, seconds), flops.forward(tokens_run, len(prompts)) / tokens, 2 * flops.all_parameters * run_share, ceiling
    )
    return result | {"prompts": len(prompts), "tokens": tokens, "tokens_run": tokens_run}


def measure_decode(context: ClientContext, prompt: list[int], batch_size: int, steps: int, flops: ModelFlops, ceiling: float, repeats: int) -> dict:
    """`steps` decode steps for `batch_size` copies of a prompt (greedy, no stopping), timed after the prefill."""
    model = context.model

    @torch.inference_mode()
    def decode():
        attention_mask, logits, cache = prefill(model, [prompt] * batch_size, context.device)
        started = time.perf_counter()
        for _ in range(steps):
            attention_mask, logits = decode_step(model, logits.argmax(-1), attention_mask, cache)
        return time.perf_counter() - started

    decode()  # warm-up
    seconds = [decode() for _ in range(repeats)]
    tokens = batch_size * steps
    result = utilisation(per_second(tokens, seconds), flops.forward(1, 1), 2 * flops.all_parameters, ceiling)
    return result | {"batch_size": batch_size, "steps": steps, "prompt_tokens": len(prompt)}


def measure_training(context: ClientContext, prompts: list[list[int]], completions: list[list[int]], flops: ModelFlops, ceiling: float, repeats: int) -> dict:
    """Forward + backward of the likelihood of `completions` after `prompts` through the LoRA model (no step)."""
    model = context.model
    batch = collate(prompts, completions, context.prompts.tokenizer.pad_token_id, context.device)
    logit_positions = sum(len(c) for c in completions)

    def forward_backward():
        logprobs = target_logprobs(model, batch)
        likelihood_loss(logprobs, batch.completion_mask).backward()
        model.zero_grad(set_to_none=True)

    model.train()
    try:
        shared = training_shared_length(model, batch.tokens)
        seconds = timed(forward_backward, repeats)
    finally:
        model.eval()
    tokens = batch.num_tokens
    tokens_run = tokens - (len(prompts) - 1) * shared  # tokens/s counts every row's; the FLOP fractions what runs
    result = utilisation(
        per_second(tokens, seconds), flops.training(tokens_run, logit_positions) / tokens, 6 * flops.all_parameters * tokens_run / tokens, ceiling
    )
    return result | {"rows": len(prompts), "tokens": tokens, "tokens_run": tokens_run, "padded_tokens": int(batch.tokens.input_ids.numel())}


# ------------------------------------------------------------------------------------------- client rounds


def measure_round(context: ClientContext, algorithm: str, work: ClientRound) -> dict:
    """One client round of `algorithm`, its metrics, and the time to pack its adapter for each upload encoding."""
    encoding = context.config.server.upload_encoding
    result = ALGORITHMS[algorithm](context, work)
    started = time.perf_counter()
    payload = encode_upload(get_adapter_state(context.model), work.global_state, encoding)
    wire = [wire_array(tensor) for tensor in payload.values()]
    packing_seconds = time.perf_counter() - started
    metrics = result.metrics
    return {
        "seconds": metrics["seconds"] + packing_seconds,
        "generation_seconds": metrics["generation_seconds"],
        "feedback_seconds": metrics["feedback_seconds"],
        "training_seconds": metrics["training_seconds"],
        "packing_seconds": packing_seconds,
        "generated_tokens": metrics["generated_tokens"],
        "generations": metrics["generations"],
        "trained_tokens": metrics["trained_tokens"],
        "peak_memory_mb": metrics["peak_memory_mb"],
        # per phase, and the training plan the memory budget chose (spearfl.lm.memory), where the client reports them
        **{key: metrics[key] for key in ROUND_MEMORY_KEYS if key in metrics},
        "weight": result.weight,
        "packed_bytes": sum(array.nbytes for array in wire),
    }


ROUND_MEMORY_KEYS = (
    "generation_peak_memory_mb", "training_peak_memory_mb", "micro_batch_rows", "checkpointed_steps",
    "planned_working_mb", "working_memory_mb",
)


def grpo_config(config: RunConfig) -> RunConfig:
    """GRPO with G = 4, the rest of its settings as configured (its budget is every method's: `client`)."""
    grpo = config.grpo.model_copy(update={"group_size": 4})
    return config.model_copy(update={"grpo": grpo})


def compared_contexts(context: ClientContext) -> dict[str, ClientContext]:
    """The two client updates the bench compares, on one model: SPEAR as configured, GRPO with G = 4."""
    return {"spear": context, "grpo": dataclasses.replace(context, config=grpo_config(context.config))}


def measure_rounds(context: ClientContext, examples, repeats: int) -> dict:
    """SPEAR and GRPO rounds on the same prompts (same round and client seeds), from the same global adapter."""
    global_state = get_adapter_state(context.model)
    contexts = compared_contexts(context)
    rounds: dict[str, list[dict]] = {"spear": [], "grpo": []}
    for repeat in range(repeats):
        work = ClientRound(0, repeat + 1, examples, global_state, context.config.optimizer.lr, context.config.seed)
        for algorithm, algorithm_context in contexts.items():
            set_adapter_state(context.model, global_state)
            rounds[algorithm].append(measure_round(algorithm_context, algorithm, work))
    set_adapter_state(context.model, global_state)
    summary = {algorithm: summarise_rounds(runs) for algorithm, runs in rounds.items()}
    ratios = {
        key: [s[key] / g[key] for s, g in zip(rounds["spear"], rounds["grpo"]) if g[key]]
        for key in ("seconds", "generated_tokens", "generation_seconds", "training_seconds")
    }
    # a ratio with no GRPO figure to divide by (GRPO trained nothing in any round) is left out, not made up
    summary["spear_over_grpo"] = {key: spread(values) for key, values in ratios.items() if values}
    summary["runs"] = rounds
    return summary


def measure_personal_rounds(context: ClientContext, examples, validation, repeats: int) -> dict:
    """A device with a personal adapter beside the global one (TAP): `repeats` rounds on the prompts of the SPEAR
    rounds, each training the global update and then the personal adapter (stage 1 on `validation` first), and
    TAP's stage 2 on the personal adapter they left; time and peak memory of each."""
    config = context.config.model_copy(update={"personal": context.config.personal.model_copy(update={"method": "tap"})})
    tap_context = dataclasses.replace(context, config=config)
    global_state = get_adapter_state(context.model)
    client = PersonalClient(0, examples, validation)
    runs = []
    for repeat in range(repeats):
        result, personal, notes = run_personal_client(
            Tap(config.personal), ALGORITHMS[config.algorithm], tap_context, client, repeat + 1, global_state, config.optimizer.lr
        )
        client.personal = personal if personal is not None else client.personal
        runs.append({key: result.metrics[key] for key in ("seconds", "training_seconds", "peak_memory_mb", "training_peak_memory_mb") if key in result.metrics}
                    | {"modules_replaced": len(notes.get("replaced", [])), "stage_one_seconds": notes.get("stage_one_seconds", 0.0)})
    _, stage_two = Tap(config.personal).after_federation(tap_context, client, global_state, repeats + 1)
    set_adapter_state(context.model, global_state)
    return {
        "tap_round": summarise_rounds(runs),
        "after_federation": {key: stage_two[key] for key in ("seconds", "training_seconds", "peak_memory_mb", "scored_tokens") if key in stage_two},
        "validation_examples": len(validation),
        "runs": runs,
    }


def summarise_rounds(runs: list[dict]) -> dict:
    """Each figure over the rounds that report it (a round that trained nothing has no training plan)."""
    keys = dict.fromkeys(key for run in runs for key, value in run.items() if isinstance(value, (int, float)))
    return {key: spread([run[key] for run in runs if key in run]) for key in keys}


def profile_rounds(context: ClientContext, examples, top: int = 20) -> dict:
    """One SPEAR and one GRPO round (same prompts, same global adapter) under torch.profiler: for each, the
    operators that took the most time of their own, and the full table as text."""
    from torch.profiler import ProfilerActivity, profile

    global_state = get_adapter_state(context.model)
    contexts = compared_contexts(context)
    work = ClientRound(0, 1, examples, global_state, context.config.optimizer.lr, context.config.seed)
    profiles = {}
    for algorithm, algorithm_context in contexts.items():
        set_adapter_state(context.model, global_state)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            started = time.perf_counter()
            ALGORITHMS[algorithm](algorithm_context, work)
            seconds = time.perf_counter() - started
        events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
        profiles[algorithm] = {
            "seconds": seconds,
            "top_operators": [
                {"name": event.key, "calls": event.count, "self_seconds": event.self_cpu_time_total / 1e6,
                 "self_share": event.self_cpu_time_total / 1e6 / seconds}
                for event in events[:top]
            ],
            "table": profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top),
        }
    set_adapter_state(context.model, global_state)
    return profiles


# ------------------------------------------------------------------------------------------- memory


def memory_reference(context: ClientContext) -> dict:
    """Bytes of the base weights, the adapter, and AdamW's state for the adapter (two moments)."""
    model = context.model
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" not in name)
    adapter = sum(p.numel() * p.element_size() for p in lora_parameters(model).values())
    return {"weights_mb": weights / 2**20, "adapter_mb": adapter / 2**20, "optimizer_mb": 2 * adapter / 2**20,
            "total_mb": (weights + 3 * adapter) / 2**20}


# ------------------------------------------------------------------------------------------- targets


def targets(report: dict) -> list[dict]:
    """The performance targets of this project, each with its figure and whether it holds."""
    model, rounds, memory = report["model"], report["rounds"], report["memory"]
    decode = {row["batch_size"]: row["tokens_per_s"]["median"] for row in model["decode"]}
    largest = max(decode)
    checks = [
        ("LoRA training >= 40% of the matmul ceiling (mfu)", model["training"]["mfu"], 0.40, ">="),
        ("prefill >= 50% of the matmul ceiling (mfu)", model["prefill"]["mfu"], 0.50, ">="),
        (f"decode at batch {largest} >= 5x the tokens/s of batch 1", decode[largest] / decode[1] if 1 in decode else None, 5.0, ">="),
        ("SPEAR round <= 0.35x a GRPO (G = 4) round, same prompts", rounds["spear_over_grpo"].get("seconds", {}).get("median"), 0.35, "<="),
        ("upload <= half the float32 adapter (bfloat16 encoding)", report["upload"]["bfloat16_over_float32"], 0.5, "<="),
        ("SPEAR round peak memory above the runtime <= 1.5x (weights + adapter + optimizer)", memory["spear_peak_over_reference"], 1.5, "<="),
        ("SPEAR round peak resident memory <= 2 GB (whole process)", memory["spear_peak_mb"] / 1024, 2.0, "<="),
        ("TAP round, two adapters, peak above the runtime <= 1.5x (weights + adapter + optimizer)", memory["tap_peak_over_reference"], 1.5, "<="),
        ("TAP round, two adapters, peak resident memory <= 2 GB (whole process)", memory["tap_peak_mb"] / 1024, 2.0, "<="),
        ("TAP stage 2 peak above the runtime <= 1.5x (weights + adapter + optimizer)", memory["tap_after_federation_over_reference"], 1.5, "<="),
        ("TAP stage 2 peak resident memory <= 2 GB (whole process)", memory["tap_after_federation_peak_mb"] / 1024, 2.0, "<="),
    ]
    return [
        {"target": name, "figure": figure, "bound": bound,
         "met": figure is not None and (figure >= bound if sense == ">=" else figure <= bound)}
        for name, figure, bound, sense in checks
    ]


# ------------------------------------------------------------------------------------------- the whole bench

PRESETS = {  # `spearfl bench --preset NAME`: configs of this repository
    "demo": "configs/demo.yaml",
    "paper": "configs/bench/paper_lora.yaml",
}


def preset_config(name: str) -> Path:
    """The config file of a bench preset, in the repository this package was installed from."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    path = Path(__file__).resolve().parents[2] / PRESETS[name]
    if not path.exists():
        raise UserError(f"preset {name!r} reads {PRESETS[name]} from a checkout of spearfl; not found at {path}: give its CONFIG instead")
    return path



@dataclass(frozen=True)
class BenchSettings:
    repeats: int  # of each throughput measurement (`spearfl bench --repeats`)
    round_repeats: int  # client rounds of each algorithm (`spearfl bench --round-repeats`)
    decode_batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_steps: int = 16
    prefill_prompts: int = 16
    matmul_size: int = 1536
    bfloat16_matmul_size: int = 512


def run_bench(context: ClientContext, examples, settings: BenchSettings, baseline_resident_mb: float, progress=None,
              validation=()) -> dict:
    """Every measurement of the module docstring, as one JSON-able report; `validation`: the client's validation
    split, for TAP's round."""
    config, device = context.config, context.device

    def step(name):
        if progress is not None:
            progress(name)

    step("matmul ceiling")
    ceilings = [matmul_ceiling(torch.float32, settings.matmul_size, settings.repeats, device)]
    ceilings.append(matmul_ceiling(torch.bfloat16, settings.bfloat16_matmul_size, max(2, settings.repeats // 2), device))
    ceiling = ceilings[0]["flops_per_s"]["median"]
    flops = count_model_flops(context.model)
    prompts = [context.prompts.task(example) for example in examples]
    step("prefill")
    prefill_rows = prompts[: settings.prefill_prompts]
    prefill_result = measure_prefill(context, prefill_rows, flops, ceiling, settings.repeats)
    step("decode")
    decode_prompt = max(prompts[: settings.prefill_prompts], key=len)
    decode_rows = [
        measure_decode(context, decode_prompt, batch_size, settings.decode_steps, flops, ceiling, settings.repeats)
        for batch_size in settings.decode_batch_sizes
    ]
    step("LoRA training")
    rows = 2 * config.spear.batch_size  # a SPEAR step: B wins and B losses
    training_examples = examples[:rows]
    completions = [context.prompts.option_completion(example.gold_label) for example in training_examples]
    training_result = measure_training(context, prompts[:rows], completions, flops, ceiling, settings.repeats)
    step("client rounds")
    rounds = measure_rounds(context, examples, settings.round_repeats)
    step("personal rounds")
    personal = measure_personal_rounds(context, examples, list(validation), settings.round_repeats)
    memory = memory_reference(context)
    tap_peak, stage_two_peak = personal["tap_round"]["peak_memory_mb"]["median"], personal["after_federation"]["peak_memory_mb"]
    adapter = get_adapter_state(context.model)
    upload = {encoding: payload_bytes(encode_upload(adapter, adapter, encoding)) for encoding in UPLOAD_ENCODINGS}
    report = {
        "machine": machine(),
        "model": {
            "name": config.model.name,
            "dtype": config.model.dtype,
            "parameters": dataclasses.asdict(flops),
            "ceiling": ceilings,
            "prefill": prefill_result,
            "decode": decode_rows,
            "training": training_result,
        },
        "rounds": rounds,
        "personal": personal,
        "memory": memory | {
            "tap_peak_mb": tap_peak,
            "tap_peak_over_reference": (tap_peak - baseline_resident_mb) / memory["total_mb"],
            "tap_after_federation_peak_mb": stage_two_peak,
            "tap_after_federation_over_reference": (stage_two_peak - baseline_resident_mb) / memory["total_mb"],
            "process_before_model_mb": baseline_resident_mb,
            "spear_peak_mb": rounds["spear"]["peak_memory_mb"]["median"],
            # the interpreter and its libraries (torch, transformers) are there before any model, whatever it is
            "spear_peak_above_runtime_mb": rounds["spear"]["peak_memory_mb"]["median"] - baseline_resident_mb,
            "spear_peak_over_reference": (rounds["spear"]["peak_memory_mb"]["median"] - baseline_resident_mb) / memory["total_mb"],
        },
        "upload": {"bytes": upload, "bfloat16_over_float32": upload["bfloat16"] / upload["float32"]},
    }
    report["targets"] = targets(report)
    return report


# ------------------------------------------------------------------------------------------- tables


def _figure(value: dict, scale: float = 1.0, decimals: int = 1) -> str:
    return f"{value['median'] * scale:,.{decimals}f} [{value['low'] * scale:,.{decimals}f}-{value['high'] * scale:,.{decimals}f}]"


def report_tables(report: dict) -> list[Table]:
    """The report for the terminal: ceiling and model throughput, client rounds, upload and memory, targets."""
    model, rounds = report["model"], report["rounds"]
    throughput = Table(title="throughput: median \\[lowest-highest] over repeats; fractions of the float32 matmul ceiling")
    for column in ("measure", "figure", "mfu (2N/6N per token)", "counted FLOPs"):
        throughput.add_column(column, justify="left" if column == "measure" else "right")
    for ceiling in model["ceiling"]:
        throughput.add_row(f"matmul {ceiling['dtype']} {ceiling['size']}^3", _figure(ceiling["flops_per_s"], 1e-9) + " GFLOP/s", "", "")
    rows = [(f"prefill, {model['prefill']['prompts']} prompts", model["prefill"])]
    rows += [(f"decode, batch {row['batch_size']}", row) for row in model["decode"]]
    rows.append((f"LoRA training, {model['training']['rows']} rows", model["training"]))
    for name, row in rows:
        throughput.add_row(name, _figure(row["tokens_per_s"]) + " tokens/s", f"{row['mfu']:.1%}", f"{row['counted_fraction']:.1%}")
    client = Table(title=f"one client round, same prompts: median \\[lowest-highest] of {rounds['spear']['seconds']['repeats']}")
    for column in ("", "SPEAR", "GRPO (G = 4)", "SPEAR / GRPO"):
        client.add_column(column, justify="left" if not column else "right")
    ratios = rounds["spear_over_grpo"]
    keys = ("seconds", "generation_seconds", "feedback_seconds", "training_seconds", "packing_seconds",
            "generations", "generated_tokens", "trained_tokens", "peak_memory_mb", *ROUND_MEMORY_KEYS)
    for key in keys:
        if key not in rounds["spear"] or key not in rounds["grpo"]:
            continue
        decimals = 2 if key.endswith("seconds") else 0
        ratio = _figure(ratios[key], decimals=2) if key in ratios else ""
        client.add_row(key.replace("_", " "), _figure(rounds["spear"][key], decimals=decimals), _figure(rounds["grpo"][key], decimals=decimals), ratio)
    memory, upload = report["memory"], report["upload"]
    sizes = Table(title="upload and memory")
    sizes.add_column("measure")
    sizes.add_column("figure", justify="right")
    for encoding, size in upload["bytes"].items():
        sizes.add_row(f"upload per client round, {encoding}", f"{size:,} B")
    sizes.add_row("base weights + adapter + AdamW state", f"{memory['total_mb']:,.0f} MB")
    sizes.add_row("SPEAR round peak resident memory (whole process)", f"{memory['spear_peak_mb']:,.0f} MB")
    sizes.add_row("process resident memory before the model loaded (runtime)", f"{memory['process_before_model_mb']:,.0f} MB")
    sizes.add_row("SPEAR round peak above the runtime", f"{memory['spear_peak_above_runtime_mb']:,.0f} MB")
    if "tap_peak_mb" in memory:
        sizes.add_row("TAP round peak resident memory, two adapters (whole process)", f"{memory['tap_peak_mb']:,.0f} MB")
        sizes.add_row("TAP stage 2 peak resident memory (whole process)", f"{memory['tap_after_federation_peak_mb']:,.0f} MB")
    checks = Table(title="targets")
    for column in ("target", "figure", "met"):
        checks.add_column(column)
    for target in report["targets"]:
        figure = "-" if target["figure"] is None else f"{target['figure']:.3f}"
        checks.add_row(target["target"], figure, "yes" if target["met"] else "[red]no[/red]")
    return [throughput, client, sizes, checks]
