"""The server side of a federated run, shared by every runtime: rounds, aggregation, evaluation, run folder.

Each round: choose K clients, hand the global adapter to a `ClientRunner` (in-process for the local
simulation, Flower messages for a deployment), aggregate what comes back with the configured server
strategy, evaluate on held-out data at eval rounds, then checkpoint. A run folder is resumed from its last
checkpoint; every random choice derives from (seed, round, client), so a resumed run repeats the history an
uninterrupted one would have written, whichever runtime ran the clients.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from spearfl.algorithms import CONFIG_SECTIONS
from spearfl.algorithms.base import ClientContext, ClientResult
from spearfl.config import PERSONAL_METHOD_SETTINGS, ConfigError, RunConfig, config_to_dict, validate
from spearfl.errors import UserError
from spearfl.federated.aggregation import (
    SERVER_STEPS,
    initial_server_state,
    lora_average_error,
)
from spearfl.federated.privacy import affordable_rounds, central_mean, epsilon_after, released_row
from spearfl.federated.robust import COMBINERS
from spearfl.federated.trust import SCREENINGS
from spearfl.federated.codec import decode_upload, payload_bytes
from spearfl.federated.schedule import learning_rate
from spearfl.lm.models import frozen_lora_state, get_adapter_state, set_adapter_state
from spearfl.runtime.adversary import backdoor_probe
from spearfl.runtime.evaluation import evaluate, trigger_metrics
from spearfl.runtime.run_folder import RunFolder, client_summary, client_table, plot_accuracy, plot_clients, summary_table
from spearfl.runtime.setup import Federation, build_context, prepare_data
from spearfl.seeds import SERVER_CLIENT_ID, derive_seed, numpy_generator

console = Console(stderr=True)
# Summed over a round's clients: the costs every client reports, and the bytes the server received.
SUMMED_METRICS = ("generations", "generated_tokens", "trained_tokens", "scored_tokens", "upload_bytes")
OPTIONAL_COUNTERS = ("wins", "losses", "revised_correct")


class RunConflict(UserError, RuntimeError):
    """The output folder holds a different run."""


def check_run_folder(folder: RunFolder, config: RunConfig) -> None:
    """Refuse to mix runs: an existing run folder must hold this very config."""
    if not folder.config_path.exists():
        return
    saved, wanted = unread_removed(with_defaults(folder.read_config())), unread_removed(config_to_dict(config))
    if saved != wanted:
        raise RunConflict(
            f"{folder.path} holds a run with a different config (fields: {', '.join(differing_fields(saved, wanted))}); "
            "choose another output folder, or delete that run folder to start it over (spearfl run --fresh)"
        )


# Fields a later version removed; no run ever read them, so a folder that holds one resumes without it.
RETIRED_FIELDS = (("feedback", "provider"),)


def with_defaults(saved: dict) -> dict:
    """A saved config with the defaults of fields added since it was written (it ran with those defaults),
    and without the fields retired since."""
    current = {key: dict(value) if isinstance(value, dict) else value for key, value in saved.items()}
    for section, name in RETIRED_FIELDS:
        if isinstance(current.get(section), dict):
            current[section].pop(name, None)
    try:
        return config_to_dict(validate(current))
    except ConfigError:
        return saved  # not a config of this version: every difference shows


def unread_removed(tree: dict) -> dict:
    """A config tree without the settings its run never reads (another personalization method's), so that a run
    folder matches a config that differs only in those (a TAP setting added since does not make a `none` run
    another run)."""
    personal = tree.get("personal")
    if not isinstance(personal, dict):
        return tree
    unread = {name for method, names in PERSONAL_METHOD_SETTINGS.items() if personal.get("method") != method for name in names}
    return tree | {"personal": {key: value for key, value in personal.items() if key not in unread}}


def differing_fields(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two config trees differ."""
    fields = []
    for key in sorted(saved.keys() | wanted.keys()):
        left, right = saved.get(key), wanted.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            fields += differing_fields(left, right, f"{prefix}{key}.")
        elif left != right:
            fields.append(f"{prefix}{key}")
    return fields


def adapter_is_identity(state: dict[str, torch.Tensor]) -> bool:
    """True when every LoRA B is zero: the adapted model then computes exactly what the base model does."""
    factors = [tensor for name, tensor in state.items() if "lora_B" in name]
    return bool(factors) and not any(bool(tensor.any()) for tensor in factors)


def base_eval_key(config: RunConfig, heldout) -> str:
    """What the base model's held-out figures depend on: the model, the prompt, the eval settings, the questions."""
    settings = config_to_dict(config)
    payload = {key: settings[key] for key in ("model", "prompt", "eval")}
    payload["trigger"] = backdoor_probe(config)
    payload["heldout"] = [dataclasses.asdict(example) for example in heldout]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def choose_clients(config: RunConfig, round_index: int) -> list[int]:
    """The K clients of a round, drawn uniformly without replacement: from a round-specific seed, or under central
    DP from the OS CSPRNG (the accountant's amplification by sampling needs a draw no one can predict, and the
    seed is in every device's config)."""
    if config.privacy.mode == "central":
        return sorted(random.SystemRandom().sample(range(config.data.num_clients), config.server.clients_per_round))
    rng = numpy_generator(derive_seed(config.seed, round_index, SERVER_CLIENT_ID, "client-selection"))
    chosen = rng.choice(config.data.num_clients, size=config.server.clients_per_round, replace=False)
    return sorted(int(client) for client in chosen)


def as_received(result: ClientResult, payload: dict[str, torch.Tensor], global_state, encoding: str) -> ClientResult:
    """The result as the server sees it: the state decoded from the payload, and the payload's size counted."""
    state = decode_upload(payload, global_state, encoding) if payload else global_state
    return ClientResult(state=state, weight=result.weight, metrics=result.metrics | {"upload_bytes": payload_bytes(payload)})


def bound_weights(replies: "RoundReplies", asked: int) -> "RoundReplies":
    """Replies that claim more weight than the prompts the server asked for are dropped, each with its reason."""
    results, rejected = [], list(replies.rejected)
    for client, result in replies.results:
        if result.weight > asked:
            rejected.append({"client": client, "reason": f"weight {result.weight} exceeds the {asked} prompts asked for"})
        else:
            results.append((client, result))
    return RoundReplies(results, rejected)


@dataclass
class RoundReplies:
    """What came back from one round's clients: accepted results, and the clients whose reply was dropped."""

    results: list[tuple[int, ClientResult]]
    rejected: list[dict] = field(default_factory=list)  # {"client": id, "reason": text}


class ClientRunner(Protocol):
    """Runs one round's client updates wherever the clients live, and returns their results."""

    def choose(self, round_index: int) -> list[int]:
        """The clients of this round (`choose_clients`, unless where they live decides who is ready)."""

    def train(self, round_index: int, clients: list[int], global_state: dict[str, torch.Tensor], lr: float) -> RoundReplies: ...

    def settle(self, round_index: int, replies: RoundReplies, global_state: dict[str, torch.Tensor]) -> None:
        """After the round is aggregated and checkpointed: tell the clients its outcome and the new global adapter."""


# (server's context, federation, progress display or None) -> runner
RunnerFactory = Callable[[ClientContext, Federation, Progress | None], ClientRunner]


def online_summary(results: list[tuple[int, ClientResult]]) -> dict:
    """Round-level online metrics: rates pooled over prompts, counts summed, time and memory at their max.

    Every client reports `REPORTED_METRICS`; counters only some algorithms keep (wins, losses, revisions)
    are summed over the clients that report them, and left out when none does.
    """
    metrics = [result.metrics for _, result in results]
    prompts = sum(m["prompts"] for m in metrics)
    summary = {
        "first_try_accuracy": sum(m["first_try_correct"] for m in metrics) / prompts if prompts else None,
        **{key: sum(m[key] for m in metrics) for key in SUMMED_METRICS},
        "client_seconds": sum(m["seconds"] for m in metrics),
        "peak_memory_mb": max((m["peak_memory_mb"] for m in metrics), default=None),
        "skipped_clients": sum(m["skipped"] for m in metrics),
    }
    summary |= {key: sum(m[key] for m in metrics if key in m) for key in OPTIONAL_COUNTERS if any(key in m for m in metrics)}
    revising = [m for m in metrics if "revised_correct" in m]
    if revising:
        wrong = sum(m["prompts"] - m["first_try_correct"] for m in revising)
        summary["revision_success"] = summary["revised_correct"] / wrong if wrong else None
    return summary


def clean(value):
    """JSON-safe metrics: NaN becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clean(item) for item in value]
    return value


class FederatedRun:
    """One run folder driven to completion, resumable; `runner` decides where the clients run."""

    def __init__(
        self,
        config: RunConfig,
        runner: RunnerFactory,
        context: ClientContext | None = None,
        show_progress: bool = True,
        base_evals: dict[str, dict] | None = None,
    ):
        """`base_evals`, shared between runs on one base model, keeps the held-out figures of an adapter that
        leaves the model unchanged (every LoRA B zero: round 0), so runs that differ only in algorithm or
        training seed evaluate the base model once (within one run, the clients' personal adapters at round 0 are
        the base model as well)."""
        self.config = config
        self.base_evals = {} if base_evals is None else base_evals
        self.folder = RunFolder(config.output_dir)
        self.make_runner = runner
        self.show_progress = show_progress
        self.context = context
        self.step = SERVER_STEPS[config.server.strategy]
        self.combine = COMBINERS[config.defense.aggregator]
        self.screen = SCREENINGS[config.defense.screening]
        self.reputation: dict[str, float] = {}  # str(client) -> [0, 1], kept in the checkpoint
        self.last_step: dict[str, torch.Tensor] | None = None  # the last global update, kept in the checkpoint
        self.private_rounds = 0  # rounds the privacy accountant has composed, kept in the checkpoint
        self.last_round = self.planned_last_round()
        self.shared_lora: dict[str, torch.Tensor] = {}  # LoRA weights no client sends (FFA-LoRA's A), from the model
        self.runner: ClientRunner | None = None

    def run(self) -> dict:
        """Run (or resume) every round; returns the summary."""
        check_run_folder(self.folder, self.config)
        if self.folder.is_complete():
            console.print(f"[green]{self.folder.path} is already complete[/green]")
            return self.folder.read_summary()
        self.folder.path.mkdir(parents=True, exist_ok=True)
        self.folder.write_config(config_to_dict(self.config))
        checkpoint = self.folder.load_checkpoint()
        start_round = 0 if checkpoint is None else checkpoint.round_index + 1
        self.folder.write_status("running", last_round=start_round - 1)
        try:
            summary = self.run_rounds(checkpoint, start_round)
        except KeyboardInterrupt:
            if self.config.server.rounds is None and self.folder.read_history():  # the way an open-ended run ends
                self.write_results()
                self.folder.write_status("interrupted", last_round=self.last_saved_round(), message="stopped; run again to continue")
                console.print(f"stopped after round {self.last_saved_round()}: {self.folder.path} has its summary; run again to continue")
                return self.folder.read_summary()
            self.folder.write_status("interrupted", last_round=self.last_saved_round(), message="stopped by Ctrl-C")
            console.print(f"[yellow]interrupted: {self.folder.path} is incomplete; run again to resume[/yellow]")
            raise
        except BaseException as error:
            self.folder.write_status("failed", last_round=self.last_saved_round(), message=repr(error))
            raise
        return summary

    def last_saved_round(self) -> int:
        """The last round whose result is checkpointed, -1 before any."""
        checkpoint = self.folder.load_checkpoint()
        return -1 if checkpoint is None else checkpoint.round_index

    def run_rounds(self, checkpoint, start_round: int) -> dict:
        config = self.config
        federation = prepare_data(config)
        if self.context is None:
            self.context = build_context(config)
        model = self.context.model
        self.shared_lora = frozen_lora_state(model)
        if checkpoint is None:
            global_state, server_state = get_adapter_state(model), initial_server_state()
        else:
            global_state, server_state = checkpoint.global_state, checkpoint.server_state
            self.reputation = dict(checkpoint.info.get("reputation", {}))
            self.last_step = checkpoint.last_step
            self.private_rounds = checkpoint.info.get("privacy", {}).get("rounds", 0)
            self.folder.rewind_to(checkpoint.round_index)
            console.print(f"resuming {self.folder.path} after round {checkpoint.round_index}")
        with self.progress() as progress:
            self.context.progress = progress if self.show_progress else None
            runner = self.make_runner(self.context, federation, self.context.progress)
            self.runner = runner
            if checkpoint is not None and "runner" in checkpoint.info and hasattr(runner, "restore"):
                runner.restore(checkpoint.info["runner"])
            if checkpoint is not None and checkpoint.personal and hasattr(runner, "restore_personal"):
                runner.restore_personal(checkpoint.personal)
            last = self.last_round  # None: until stopped
            rounds_bar = progress.add_task("rounds", total=None if last is None else last + 1, completed=start_round)
            for round_index in itertools.count(start_round) if last is None else range(start_round, last + 1):
                if round_index == 0:
                    row = {"round": 0, "lr": 0.0, "clients": []}
                else:
                    global_state, server_state, row, replies = self.train_round(runner, round_index, global_state, server_state)
                    if row.get("lora_average_error") is not None:  # mean(B) mean(A) against mean(B A), in sight while it runs
                        progress.update(rounds_bar, description=f"rounds (LoRA average error {row['lora_average_error']:.3f})")
                if self.ends_federation(round_index) and hasattr(runner, "after_federation"):
                    trained = runner.after_federation(round_index, global_state)
                    if trained:  # the history of a run without personalization is as it was
                        row["after_federation"] = trained
                if round_index % config.eval.every == 0 or round_index == last:
                    set_adapter_state(model, global_state)
                    row["eval"] = clean(self.evaluate(federation.heldout, global_state))
                    if any(federation.client_heldout):
                        row["client_eval"] = clean(self.evaluate_clients(federation.client_heldout, global_state))
                    self.folder.save_adapter(round_index, global_state)
                    self.report_eval(round_index, row["eval"])
                self.folder.append_history(clean(row))
                self.folder.save_checkpoint(
                    round_index, global_state, server_state, info=self.checkpoint_info(round_index), last_step=self.last_step,
                    personal=runner.personal_states() if hasattr(runner, "personal_states") else None,
                )
                self.folder.write_status("running", last_round=round_index)
                if round_index > 0:
                    runner.settle(round_index, replies, global_state)
                progress.advance(rounds_bar)
        return self.finish()

    def train_round(self, runner: ClientRunner, round_index: int, global_state, server_state):
        config = self.config
        lr = learning_rate(
            round_index, config.server.rounds, config.optimizer.lr, config.optimizer.warmup_rounds, config.optimizer.min_lr_ratio
        )
        asked = config.budget(CONFIG_SECTIONS[config.algorithm]).prompts_per_round
        chosen = runner.choose(round_index)
        replies = bound_weights(runner.train(round_index, chosen, global_state, lr), asked)
        for rejected in replies.rejected:
            console.print(f"[yellow]round {round_index}: dropped the reply of client {rejected['client']}: {rejected['reason']}[/yellow]")
        results = replies.results
        if config.server.keep_client_updates:
            self.folder.save_client_updates(round_index, {client: r.state for client, r in results if r.weight > 0}, global_state)
        started = time.perf_counter()
        screened = self.screen(
            global_state, [r.state for _, r in results], [r.weight for _, r in results], [client for client, _ in results],
            [r.metrics for _, r in results], self.reputation, config.defense, global_step=self.last_step,
        )
        if config.privacy.mode == "central":
            factors = [screened / result.weight if result.weight > 0 else 0.0 for screened, (_, result) in zip(screened.weights, results)]
            combined, notes = central_mean(global_state, screened.states, factors, len(chosen), config.privacy)
        else:
            combined, notes = self.combine(global_state, screened.states, screened.weights, config.defense)
        if "degenerate" in notes:
            console.print(f"[bold yellow]round {round_index}: defense.aggregator {config.defense.aggregator} defends nothing this round ({notes['degenerate']})[/bold yellow]")
        new_global, new_server_state = self.step(global_state, combined, server_state, config.server)
        server_seconds = time.perf_counter() - started
        self.reputation = screened.reputation
        if config.defense.screening != "none":  # what the next round's alignment and novelty compare with
            self.last_step = {key: new_global[key] - global_state[key] for key in global_state}
        row = {
            "round": round_index,
            "lr": lr,
            "clients": [{"client": client, "weight": r.weight, "metrics": r.metrics} for client, r in results],
            "online": online_summary(results),
            # a blind server (secure aggregation) sees only the mean, so it cannot measure the error of averaging A and B apart
            "lora_average_error": None if config.server.secure_aggregation != "none" else lora_average_error(screened.states, screened.weights, self.shared_lora),
            "server_seconds": server_seconds,  # screening, combination, noise and the server step
        }
        if screened.records:
            row["screening"] = screened.records
        if notes:
            row["aggregation"] = notes
        if config.privacy.mode != "none":
            self.private_rounds += 1
            row["privacy"] = {"epsilon": self.epsilon(self.private_rounds), "delta": config.privacy.delta}
        if replies.rejected:
            row["rejected"] = replies.rejected
        if config.privacy.mode == "central":
            row = released_row(row)
        elif config.privacy.mode == "local":
            row["online"] = None  # the devices release no counters under local DP (spearfl.federated.privacy.public_reply)
        return new_global, new_server_state, row, replies

    def planned_last_round(self) -> int | None:
        """The configured last round, or the last one the privacy budget affords, if earlier."""
        settings, rounds = self.config.privacy, self.config.server.rounds
        if settings.mode == "none" or settings.epsilon_budget is None:
            return rounds
        affordable = affordable_rounds(settings, self.config.data.num_clients, self.config.server.clients_per_round, rounds or 10**6)
        if affordable == 0:
            raise UserError(
                f"privacy.epsilon_budget {settings.epsilon_budget} affords no round: one round spends epsilon "
                f"{self.epsilon(1):.3g}; raise the budget or privacy.noise_multiplier"
            )
        if rounds is None or affordable < rounds:
            console.print(f"the privacy budget (epsilon {settings.epsilon_budget}) affords {affordable} rounds: the run stops after round {affordable}")
        return affordable if rounds is None else min(rounds, affordable)

    def epsilon(self, num_rounds: int) -> float:
        config = self.config
        return epsilon_after(num_rounds, config.privacy, config.data.num_clients, config.server.clients_per_round)

    def checkpoint_info(self, round_index: int) -> dict:
        """What a resumed run needs beside the adapters: the reputation and the privacy accountant's rounds."""
        info = {"round": round_index, "reputation": self.reputation}
        if hasattr(self.runner, "state"):  # what the runner keeps across a restart (Flower: clients bound to nodes)
            info["runner"] = self.runner.state()
        if self.config.privacy.mode != "none":
            info["privacy"] = {"rounds": self.private_rounds, "epsilon": self.epsilon(self.private_rounds)}
        return info

    def evaluate(self, heldout, global_state, probe_backdoor: bool = True, progress: bool = True) -> dict:
        """Held-out metrics of the model as it stands (its adapter already set to `global_state`); the backdoor's
        reach beside them unless `probe_backdoor` is False (each client's own held-out set)."""
        key = None
        if self.base_evals is not None and adapter_is_identity(global_state):
            key = base_eval_key(self.config, heldout) + ("" if probe_backdoor else "/no-probe")
            if key in self.base_evals:
                if progress:
                    console.print("held-out figures of the base model (every LoRA B is zero), as evaluated for an earlier run")
                return copy.deepcopy(self.base_evals[key])
        metrics = evaluate(self.context.model, self.context.prompts, heldout, self.config.eval, progress=progress and (self.context.progress or False))
        probe = backdoor_probe(self.config) if probe_backdoor else None
        if probe is not None:
            metrics |= trigger_metrics(self.context.model, self.context.prompts, heldout, *probe, self.config.eval)
        if key is not None:
            self.base_evals[key] = copy.deepcopy(metrics)
        return metrics

    def ends_federation(self, round_index: int) -> bool:
        """Whether the after-federation stage (personal.method's) runs after this round: after the last round of a
        bounded run, every personal.after_every rounds of an open-ended one."""
        if round_index == 0:
            return False
        if self.last_round is not None:
            return round_index == self.last_round
        every = self.config.personal.after_every
        return every > 0 and round_index % every == 0

    def evaluate_clients(self, client_heldout: list[list], global_state) -> list[dict]:
        """Each client's own held-out figures under the model as it stands (its adapter set to the global one), and
        under its personal adapter where the method keeps one; the model's adapter is the global one afterwards."""
        model = self.context.model
        rows = [
            {"client": client, "global": self.evaluate(examples, global_state, probe_backdoor=False, progress=False)}
            for client, examples in enumerate(client_heldout)
        ]
        personal = self.runner.personal_adapters(global_state) if hasattr(self.runner, "personal_adapters") else None
        if personal is not None:
            for row, examples in zip(rows, client_heldout):
                own = personal[row["client"]]
                set_adapter_state(model, own)
                row["personal"] = self.evaluate(examples, own, probe_backdoor=False, progress=False)
            set_adapter_state(model, global_state)
        return rows

    def report_eval(self, round_index: int, metrics: dict) -> None:
        shown = ", ".join(f"{key} {value:.3f}" for key, value in metrics.items() if isinstance(value, float))
        console.print(f"round {round_index} held-out: {shown}")

    def finish(self) -> dict:
        """Write summary and plot, mark the folder complete, print the table."""
        self.write_results()
        stopped_early = self.last_round != self.config.server.rounds
        message = f"the privacy budget (epsilon {self.config.privacy.epsilon_budget}) was spent" if stopped_early else ""
        self.folder.write_status("complete", last_round=self.last_round, message=message)
        summary = self.folder.read_summary()
        if self.show_progress:
            console.print(summary_table(summary))
            if "clients" in summary:
                console.print(client_table(summary["clients"]))
        return summary

    def write_results(self) -> None:
        """summary.json (first and last held-out figures, totals) and the plot, from the history so far."""
        history = self.folder.read_history()
        evals = [row for row in history if "eval" in row]
        online = [row["online"] for row in history if row.get("online") is not None]
        extra = {
            "algorithm": self.config.algorithm,
            "dataset": self.config.data.name,
            "seed": self.config.seed,
            "rounds": history[-1]["round"],
            # None under DP, whose history releases no client counters
            **{key: sum(o[key] for o in online) if online else None for key in ("generated_tokens", "trained_tokens", "upload_bytes", "client_seconds")},
            "peak_memory_mb": max((o["peak_memory_mb"] for o in online if o["peak_memory_mb"] is not None), default=None),
        }
        if self.runner is not None and hasattr(self.runner, "personal_states"):
            self.folder.save_personal(self.runner.personal_states())
        per_client = [row["client_eval"] for row in history if "client_eval" in row]
        if per_client:
            extra["clients"] = client_summary(per_client[-1])
            plot_clients(per_client[-1], self.folder.path / "clients.png")
        private = [row["privacy"] for row in history if "privacy" in row]
        if private:
            extra["privacy"] = private[-1]  # (epsilon, delta) of the whole run
        self.folder.write_summary(evals[0]["eval"], evals[-1]["eval"], extra)
        plot_accuracy(history, self.folder.plot_path)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=not self.show_progress, transient=False,
        )
