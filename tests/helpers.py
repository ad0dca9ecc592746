"""Builders shared by the SPEAR, evaluation, runtime and CLI tests: tokenizer, tiny LoRA model, scripted
generation, and a primed tiny model with a synthetic dataset and config for end-to-end runs."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import spearfl.algorithms.base
from spearfl.algorithms.base import ClientContext, ClientRound
from spearfl.config import LoraConfig, RunConfig, load_config
from spearfl.data.prompts import REVISION_INSTRUCTION, PromptFormat
from spearfl.data.schema import Example
from spearfl.feedback.providers import make_oracle
from spearfl.lm.forward import PADDING_ID
from spearfl.lm.generation import Completion, generate
from spearfl.lm.models import (
    DEFAULT_MODEL,
    attach_lora,
    evaluation_mode,
    freeze,
    get_adapter_state,
    load_tokenizer,
)
from spearfl.lm.training import collate, target_logprobs
from spearfl.runtime.local import run_local
from spearfl.runtime.setup import build_context

TIMING_KEYS = {"seconds", "peak_memory_mb", "updated_at"}


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: on a small shared machine, more threads spin against each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def shared_tokenizer():
    """The default model's tokenizer (converted once into the cache; later loads take a fraction of a second)."""
    return load_tokenizer(DEFAULT_MODEL)


def build_tiny_model(tokenizer, seed: int) -> LlamaForCausalLM:
    """A randomly initialised two-layer Llama over the tokenizer's vocabulary, frozen: for fast tests."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    freeze(model)
    return model


def tiny_lora_model(tokenizer, seed: int = 0, rank: int = 4, dropout: float = 0.0):
    """A fresh two-layer random Llama with a LoRA adapter on every linear projection."""
    model = build_tiny_model(tokenizer, seed=seed)
    return attach_lora(model, LoraConfig(rank=rank, alpha=2 * rank, dropout=dropout), seed=seed + 1)


# Float32 rounding, the unit every tolerance between two float32 computations of one quantity is counted in.
FLOAT32_UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2
# How many times the plain computation's own rounding error another order of the same arithmetic may reach. Both
# orders' errors are bounded alike (gamma_n times the sum of the terms' magnitudes) and are sums of many independent
# unit roundoffs of the same length, so their ratio is of order 1 (the norms of two such error vectors concentrate;
# a scalar's floor is one rounding of its value). The float64 reference must then be float64 throughout, norms
# included (tests/conftest.py). A lost term is 10^4-10^11 times float32 rounding.
ROUNDING_FACTOR = 16


def rounding_excess(got: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor) -> float:
    """How far `got` is from the float64 `reference`, in units of how far `plain` (the same float32 quantity
    computed the plain way) is from it, or of the quantity's own float32 rounding where `plain` is closer.

    Both float32 results carry rounding; the float64 reference carries about 2^-29 as much. So a correct `got`
    scores about 1 whatever the CPU's kernels, and a wrong one scores its error over float32 rounding.
    """
    got, plain, reference = (value.detach().double() for value in (got, plain, reference))
    own_rounding = FLOAT32_UNIT_ROUNDOFF * float(reference.norm())
    scale = max(float((plain.double() - reference).norm()), own_rounding, torch.finfo(torch.float64).tiny)
    return float((got.double() - reference).norm()) / scale


def assert_float32_close(got, plain, reference, name: str = "") -> None:
    """`got` (a tensor, or a float) is as close to the float64 `reference` as float32 rounding lets `plain` be."""
    got, plain, reference = (torch.as_tensor(value, dtype=torch.float64) for value in (got, plain, reference))
    excess = rounding_excess(got, plain, reference)
    assert excess <= ROUNDING_FACTOR, f"{name}: {excess:.1f} times float32 rounding from the float64 reference"


def float64_twin(model):
    """A float64 copy of a model: the reference float32 results are measured against (`assert_float32_close`)."""
    import copy

    return copy.deepcopy(model).to(torch.float64)


def encode_task(tokenizer, example: Example) -> list[int]:
    """Token ids of an example's first-attempt prompt, without an answer prefix."""
    return PromptFormat(tokenizer, answer_prefix=False).task(example)


@torch.no_grad()
def completion_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 8, temperature: float = 1.0
) -> list[torch.Tensor]:
    """Reference scores: each completion token's log-probability after its prompt under softmax(logits / temperature),
    dropout off, float32 on the CPU."""
    device = next(model.parameters()).device
    rows = []
    with evaluation_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = completions[start : start + batch_size]
            batch = collate(prompts[start : start + batch_size], chunk, PADDING_ID, device)
            logprobs = target_logprobs(model, batch, temperature)  # [B, K]
            rows += [logprobs[row, -len(ids) :].cpu() for row, ids in enumerate(chunk)]
    return rows


def make_config(*overrides: str) -> RunConfig:
    """The default config with `a.b=c` overrides."""
    return load_config(None, list(overrides))


def make_context(model, tokenizer, config: RunConfig, feedback=None) -> ClientContext:
    prompt_format = PromptFormat(tokenizer, answer_prefix=config.prompt.answer_prefix)
    return ClientContext(model, prompt_format, feedback or make_oracle(config.feedback.hint, config.feedback.max_hint_sentences, config.feedback.remind_format), config, torch.device("cpu"))


def multiple_choice(uid: str, question: str, options: tuple[str, ...], gold: int, **fields) -> Example:
    return Example(uid=uid, question=question, options=options, gold=gold, **fields)


def completion_from_ids(tokenizer, token_ids: list[int], finished_by: str = "stop") -> Completion:
    return Completion(list(token_ids), tokenizer.decode(token_ids, skip_special_tokens=True), finished_by)


def completion_from_text(tokenizer, text: str, finished_by: str = "stop") -> Completion:
    """A completion spelled with the canonical tokenisation of `text`, plus EOS when it finished by EOS."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if finished_by == "eos":
        ids = ids + [tokenizer.eos_token_id]
    return completion_from_ids(tokenizer, ids, finished_by)


@dataclass
class GenerationCall:
    prompts: list[list[int]]
    seed: int
    is_revision: list[bool]


@dataclass
class ScriptedGeneration:
    """Stands in for `spearfl.lm.generation.generate`: answers each example from a script, records every call.

    script: question text -> completions for the first attempt, then each revision, in order.
    """

    tokenizer: object
    script: dict[str, list[Completion]]
    calls: list[GenerationCall] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)

    def __call__(self, model, tokenizer, prompts, **settings) -> list[Completion]:
        texts = [self.tokenizer.decode(prompt) for prompt in prompts]
        self.calls.append(GenerationCall([list(p) for p in prompts], settings["seed"], [REVISION_INSTRUCTION in t for t in texts]))
        results = []
        for text in texts:
            question = self.question_in(text)
            attempt = self.served.get(question, 0)
            self.served[question] = attempt + 1
            results.append(self.script[question][attempt])
        return with_sampler_logprobs(model, prompts, results, settings["settings"].temperature)

    def question_in(self, prompt_text: str) -> str:
        matches = [question for question in self.script if question in prompt_text]
        assert len(matches) == 1, f"prompt matches {matches}"
        return matches[0]


def with_sampler_logprobs(model, prompts, completions: list[Completion], temperature: float) -> list[Completion]:
    """The completions with the log-probs `generate` would have recorded for them (none on a StubModel)."""
    if isinstance(model, StubModel):
        return completions
    token_ids = [c.token_ids for c in completions]
    rows = completion_logprobs(model, [list(p) for p in prompts], token_ids, batch_size=8, temperature=temperature or 1.0)
    return [dataclasses.replace(c, logprobs=row.tolist()) for c, row in zip(completions, rows)]


class StubModel:
    """Enough of a model for code paths that only switch modes (scripted generation)."""

    training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def strip_timing(value):
    """History or metrics without wall-clock and memory fields, which differ between identical runs."""
    if isinstance(value, dict):
        return {
            key: strip_timing(item)
            for key, item in value.items()
            if key not in TIMING_KEYS and not key.endswith(("_seconds", "_memory_mb"))
        }
    if isinstance(value, list):
        return [strip_timing(item) for item in value]
    return value


def read_history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "history.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# End-to-end assets: a synthetic two-option dataset and a tiny model primed to answer in the format.

WORDS = [
    ("red", "dog"), ("blue", "cat"), ("green", "table"), ("yellow", "horse"), ("purple", "chair"),
    ("orange", "river"), ("pink", "stone"), ("black", "bread"), ("white", "cloud"), ("brown", "spoon"),
    ("grey", "shoe"), ("violet", "lamp"), ("cyan", "apple"), ("gold", "window"), ("silver", "road"),
    ("beige", "tree"), ("maroon", "glass"), ("teal", "paper"), ("navy", "bottle"), ("olive", "pencil"),
]


def synthetic_records() -> list[dict]:
    """40 two-option items: "Which word is a colour?" with the colour first or second."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(40):
        colour, thing = WORDS[index % len(WORDS)]
        kind = "colour" if index < 20 else "object"
        right, wrong = (colour, thing) if kind == "colour" else (thing, colour)
        options = [right, wrong] if rng.random() < 0.5 else [wrong, right]
        question = f"Item {index}: which word names a{'n' if kind == 'object' else ''} {kind}?"
        records.append({"id": f"q{index}", "question": question, "options": options, "answer": right})
    return records


def prime_model(tokenizer, examples: list[Example], num_steps: int = 60) -> torch.nn.Module:
    """Plain cross-entropy on prompt -> "Answer: <gold>\\n", so the random model answers in the format.

    Logits are computed only where an answer token is predicted: the vocabulary projection dominates the cost.
    """
    model = build_tiny_model(tokenizer, seed=0)
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = []
    for example in examples:
        prompt = encode_task(tokenizer, example)
        answer = tokenizer.encode(f"Answer: {example.gold_label}\n", add_special_tokens=False)
        rows.append((prompt, answer))
    rng = np.random.default_rng(0)
    for _ in range(num_steps):
        batch = [rows[int(i)] for i in rng.choice(len(rows), size=8, replace=False)]
        length = max(len(p) + len(a) for p, a in batch)
        input_ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        positions, targets = [], []
        for row, (prompt, answer) in enumerate(batch):
            input_ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            attention[row, : len(prompt) + len(answer)] = 1
            positions += [(row, len(prompt) - 1 + offset) for offset in range(len(answer))]
            targets += answer
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state  # [B, L, H]
        rows_index, columns_index = zip(*positions)
        logits = model.lm_head(hidden[list(rows_index), list(columns_index)])  # [N, V]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class EndToEndAssets:
    root: Path
    model_dir: Path
    dataset: Path


@functools.cache
def end_to_end_assets() -> EndToEndAssets:
    """Primed model folder and JSONL dataset, built once per test process in a temporary folder."""
    from spearfl.data.sources import load_jsonl

    root = Path(tempfile.mkdtemp(prefix="spearfl-e2e-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    dataset = root / "colours.jsonl"
    dataset.write_text("".join(json.dumps(record) + "\n" for record in synthetic_records()))
    tokenizer = shared_tokenizer()
    with single_thread():
        model = prime_model(tokenizer, load_jsonl(dataset))
    model_dir = root / "primed-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return EndToEndAssets(root, model_dir, dataset)


def run_config_text(assets: EndToEndAssets, output_dir: Path) -> str:
    """2 rounds x 2 clients, tiny settings, evaluation every round."""
    return f"""\
seed: 7
output_dir: {output_dir}
model: {{name: {assets.model_dir}, device: cpu}}
lora: {{rank: 4, alpha: 8, dropout: 0.1}}
data: {{dataset: "jsonl:{assets.dataset}", heldout_size: 8, num_clients: 3, min_per_client: 6, max_per_client: 12}}
feedback: {{hint: none}}
generation: {{temperature: 1.0, max_new_tokens: 8, batch_size: 8}}
optimizer: {{lr: 0.01, max_grad_norm: 1.0}}
client: {{prompts_per_round: 6, local_steps: 2}}
spear: {{num_revisions: 1, batch_size: 4, margin: 0.0}}
server: {{rounds: 2, clients_per_round: 2}}
eval: {{every: 1, batch_size: 8, max_new_tokens: 8}}
"""


def write_run_config(assets: EndToEndAssets, path: Path, output_dir: Path) -> Path:
    path.write_text(run_config_text(assets, output_dir))
    return path


@functools.cache
def reference_run() -> Path:
    """An uninterrupted run through the Python API, shared by the resume and the repeat checks."""
    from spearfl.runtime.local import run_local

    assets = end_to_end_assets()
    output_dir = assets.root / "reference-run"
    config = load_config(write_run_config(assets, assets.root / "reference.yaml", output_dir))
    with single_thread():
        run_local(config, show_progress=False)
    return output_dir


def one_round(tmp_path, monkeypatch, algorithm: str, *overrides: str):
    """One round, two clients, through run_local on the primed tiny model, recording samples and verdicts."""
    assets = end_to_end_assets()
    config = load_config(
        write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run"),
        [f"algorithm={algorithm}", "server.rounds=1", "eval.methods=[loglik]", *overrides],
    )
    context = build_context(config)
    calls = []

    def spy_generate(*args, **kwargs):
        completions = generate(*args, **kwargs)
        calls.append((args[2], kwargs["seed"], completions))
        return completions

    monkeypatch.setattr(spearfl.algorithms.base, "generate", spy_generate)
    judged = []
    oracle = context.feedback
    context.feedback = lambda example, text: judged.append((example, oracle(example, text))) or judged[-1][1]
    base_before = {name: p.detach().clone() for name, p in context.model.named_parameters() if "lora_" not in name}
    run_local(config, show_progress=False, context=context)
    for name, value in context.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(value, base_before[name]), f"base parameter {name} changed"
    history = read_history(tmp_path / "run")
    adapters = [load_file(tmp_path / "run" / "adapters" / f"round_{index:04d}.safetensors") for index in (0, 1)]
    assert any(not torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
    return config, calls, judged, history[1]


def work_order(examples, global_state, round_index=1, client_id=0, lr=1e-3):
    return ClientRound(client_id, round_index, list(examples), global_state, lr, run_seed=0)


def answers(tokenizer, *labels):
    return [completion_from_text(tokenizer, f"Answer: {label}\n") for label in labels]


def scripted(monkeypatch, tokenizer, script) -> ScriptedGeneration:
    generation = ScriptedGeneration(tokenizer, {example.question: completions for example, completions in script.items()})
    monkeypatch.setattr(spearfl.algorithms.base, "generate", generation)
    return generation


def first_calls_beside_spear(monkeypatch, tokenizer, module, labels: tuple[str, ...], *overrides: str):
    """The first generation call of a SPEAR round and of `module`'s round on the same work order, untrained.

    Seven yes/no questions, each scripted to answer `labels` in turn; client 2, round 4, 3 prompts a round.
    """
    import spearfl.algorithms.spear as spear

    pool = [Example(uid=f"t/{index}", question=f"Question number {index}?", options=("yes", "no"), gold=0) for index in range(7)]
    script = {example: answers(tokenizer, *labels) for example in pool}
    model = tiny_lora_model(tokenizer)
    context = make_context(model, tokenizer, make_config("client.prompts_per_round=3", *overrides))
    work = work_order(pool, get_adapter_state(model), round_index=4, client_id=2)
    calls = []
    for algorithm in (spear, module):
        generation = scripted(monkeypatch, tokenizer, script)
        monkeypatch.setattr(algorithm, "train", lambda *args: {})
        algorithm.client_update(context, work)
        calls.append(generation.calls[0])
    return calls


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
