"""Typed run configuration: one YAML file plus `a.b=c` overrides, validated before any work starts.

Defaults come from the SPEAR reference configs (arXiv 2605.07977) where a comment says "the reference's";
every other default is our own choice, and its comment says why. They live here only: presets (configs/*.yaml) override a few fields of them, and library settings (LoRA, the
server optimizer) take these sections as they are. Unknown keys are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spearfl.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class LoraConfig(Section):
    rank: int = Field(16, ge=1)  # the reference's
    alpha: float = Field(32.0, gt=0)  # the reference's
    dropout: float = Field(0.1, ge=0, lt=1)  # the reference's
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the reference's: all
    layers: list[int] | None = None  # None: every layer, as the reference
    checkpoint_activations: bool = False  # recompute LoRA layers' activations in the backward pass: less memory, more time
    # FFA-LoRA (Sun et al. 2024, arXiv 2403.12313): A stays at its shared initialisation and only B is trained
    # and sent, so the server's average of B times the common A is exactly the average of the clients' updates.
    # Every process draws the same A from the run seed; uploads and saved adapters hold B only (about half the bytes).
    ffa: bool = False


class TaskConfig(Section):
    """One task of a multi-task federation (data.tasks): its dataset and how many clients hold it."""

    dataset: str
    clients: int = Field(ge=1)
    label_style: Literal["letters", "numbers", "text"] | None = None  # else data.label_style, else the dataset's own


class DataConfig(Section):
    dataset: str | None = None  # arc_easy when no data.tasks are given; none beside them
    label_style: Literal["letters", "numbers", "text"] | None = None
    heldout_size: int = Field(300, ge=1)  # our choice: at 300 one question moves accuracy by a third of a point
    split_seed: int = 0  # the held-out set stays the same across run seeds, so seeds differ only in training
    num_clients: int = Field(50, ge=1)  # the reference's
    dirichlet_alpha: float = Field(1.0, gt=0)  # the reference's label skew
    min_per_client: int = Field(1, ge=1)
    max_per_client: int = Field(500, ge=1)  # the reference's 400-500 examples a client
    # Our choice: each client's own held-out share, never trained on, scored at every evaluation with the global
    # adapter (per-client accuracy: the mean, the worst client, each client). 0: no per-client evaluation.
    client_heldout_fraction: float = Field(0.0, ge=0, lt=1)
    # A multi-task federation: clients hold different tasks, `clients` of them each, with the label skew above inside
    # each task. Each task keeps its own held-out set of `heldout_size` examples; the global held-out set is their
    # union. Empty: every client holds `dataset`.
    tasks: list[TaskConfig] = []

    @model_validator(mode="after")
    def _check_bounds(self) -> "DataConfig":
        if self.min_per_client > self.max_per_client:
            raise ValueError("min_per_client must not exceed max_per_client")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_dataset(cls, data):
        if isinstance(data, dict) and not data.get("tasks") and data.get("dataset") is None:
            return {**data, "dataset": "arc_easy"}
        return data

    @model_validator(mode="after")
    def _check_tasks(self) -> "DataConfig":
        if not self.tasks:
            return self
        if self.dataset is not None:
            raise ValueError("data.dataset and data.tasks exclude each other: name every dataset under data.tasks")
        names = [task.dataset for task in self.tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"data.tasks: {', '.join(repeated)} listed twice; give one task its clients in one entry")
        held = sum(task.clients for task in self.tasks)
        if held != self.num_clients:
            raise ValueError(f"data.tasks hold {held} clients in all, but data.num_clients is {self.num_clients}")
        return self

    @property
    def datasets(self) -> list[str]:
        """Every dataset the clients hold: the tasks', or the one `dataset`."""
        return [task.dataset for task in self.tasks] or [self.dataset]

    @property
    def name(self) -> str:
        """The data's name for tables and summaries: the dataset, or the tasks joined by '+'."""
        return "+".join(self.datasets)


class FeedbackConfig(Section):
    hint: str = "none"
    max_hint_sentences: int = Field(2, ge=1)  # our choice: short enough that a solution's last step stays hidden
    remind_format: bool = False  # an unparseable answer is told so (names no option)
    # Where verdicts come from (spearfl.feedback.verifiers, .judge): the dataset's own scoring (oracle), a rule
    # (numeric within `tolerance`, exact, math (LaTeX final answers equivalent, by math-verify), a regex `pattern` with {answer} for the gold, a Python `function`
    # named module:function), or a local model (`judge_model`) with a `rubric`.
    provider: Literal["oracle", "numeric", "exact", "math", "regex", "python", "judge"] = "oracle"
    tolerance: float = Field(1e-6, ge=0)
    pattern: str | None = None
    function: str | None = None
    judge_model: str | None = None
    rubric: str | None = None

    @model_validator(mode="after")
    def _check_provider(self) -> "FeedbackConfig":
        needed = {"regex": "pattern", "python": "function", "judge": "judge_model"}.get(self.provider)
        if needed and getattr(self, needed) is None:
            raise ValueError(f"provider {self.provider!r} needs feedback.{needed}")
        return self


class PromptConfig(Section):
    answer_prefix: bool = False  # start every reply with "Answer:" already written (for small models)
    # Reason step by step, then end with the answer line; the last declared answer counts (MATH, StrategyQA).
    reasoning: bool = False
    # auto: the tokenizer's chat template when it has one; never: plain text, for base (non-instruct) models
    # whose tokenizer ships a template they were not trained on; always: the template, an error without one.
    chat_template: Literal["auto", "always", "never"] = "auto"

    @model_validator(mode="after")
    def _check_reasoning(self) -> "PromptConfig":
        if self.reasoning and self.answer_prefix:
            raise ValueError("reasoning and answer_prefix exclude each other: a reply that opens with the answer has no room to reason")
        return self


class GenerationConfig(Section):
    temperature: float = Field(0.8, ge=0)  # the reference's
    top_p: float = Field(0.95, gt=0, le=1)  # the reference's
    max_new_tokens: int = Field(256, ge=1)  # the reference's: room for a chain of thought
    batch_size: int = Field(16, ge=1)  # our choice: rows generated together, a memory bound, not a result


class OptimizerConfig(Section):
    lr: float = Field(5e-5, gt=0)  # the reference's AdamW peak rate
    warmup_rounds: int = Field(0, ge=0)  # our choice: the reference warms up, the paper presets take 5 rounds
    min_lr_ratio: float = Field(0.2, ge=0, le=1)  # the reference's cosine floor: 0.2 of the peak
    weight_decay: float = Field(0.0, ge=0)  # our choice: AdamW without decay, the adapter starts at zero
    max_grad_norm: float | None = Field(1.0, gt=0)  # our choice: the common clip, guards a round's few steps


class ClientConfig(Section):
    """The budget of every client round, whatever the method: prompts answered and optimizer steps taken.

    One place for all methods, so a comparison gives each the same budget (learning rate, schedule and tokens
    per completion are one field each for every method too: `optimizer`, `generation.max_new_tokens`).
    """

    prompts_per_round: int = Field(16, ge=1)  # our choice for a CPU; the reference configs use 80-160
    local_steps: int = Field(5, ge=1)  # optimizer steps a client round (the reference's 5)
    # Peak resident memory a client round may reach, MB (the whole process; on a GPU, the device's allocated
    # memory). Each training step is planned to fit (micro-batches, activation checkpointing, the vocabulary in
    # chunks), and the prompt states kept for revisions take at most that room (spearfl.lm.memory). None:
    # plan for 192 MB of working memory. Not a learning setting: the gradient and the states are the same
    # whatever the plan (float32 rounding apart).
    memory_budget_mb: float | None = Field(None, gt=0)


# A method's own prompts_per_round / local_steps (None: the client section's), for single-method ablations;
# `spearfl compare` refuses methods whose budgets differ.
MethodBudget = Field(None, ge=1)


class SpearConfig(Section):
    prompts_per_round: int | None = MethodBudget
    local_steps: int | None = MethodBudget
    num_revisions: int = Field(2, ge=0)  # the reference's R
    batch_size: int = Field(16, ge=1)  # the reference's B: 16 wins and 16 losses a step
    lambda_win: float = Field(1.0, ge=0)  # the reference's
    lambda_lose: float = Field(0.1, ge=0)  # the reference's
    lambda_anchor: float = Field(0.0, ge=0)  # the reference's
    margin: float = Field(0.3, ge=0, lt=1)  # the reference's m
    # Our choice: the reference sets T per dataset; 8 covers an answer line ("Answer: " and a short option),
    # and the chain-of-thought presets raise it to reach into the last reasoning step.
    tail_tokens: int = Field(8, ge=1)
    # rho: the reference uses 2 to 4 (4 on math, as the math presets set); 2 for the rest is our choice.
    lose_cap_ratio: float = Field(2.0, ge=0)
    # Our choice: SPEAR.md fixes only the order (a loss a revision fixed is surer than one never fixed).
    confidence_fixed: float = Field(1.0, ge=0, le=1)
    confidence_unfixed: float = Field(0.5, ge=0, le=1)
    protected_strings: list[str] = ["Answer:"]


class GrpoConfig(Section):
    """GRPO (Shao et al. 2024, arXiv 2402.03300) as a client update; defaults are common GRPO settings."""

    prompts_per_round: int | None = MethodBudget
    local_steps: int | None = MethodBudget
    group_size: int = Field(4, ge=2)
    # Passes over all of a round's rollouts (PPO epochs), the local steps shared among them as evenly as they
    # go: each step takes the next minibatch of its pass. From the second step on the policy has moved, so the
    # ratio departs from 1 and the clip acts.
    passes: int = Field(2, ge=1)
    clip_epsilon: float = Field(0.2, gt=0)
    kl_coef: float = Field(0.04, ge=0)  # KL to the round-start (global) adapter


class OpsdConfig(Section):
    """On-policy self-distillation: a frozen round-start teacher that sees privileged context."""

    prompts_per_round: int | None = MethodBudget
    local_steps: int | None = MethodBudget
    batch_size: int = Field(8, ge=1)
    privileged: list[Literal["answer", "solution", "facts"]] = Field(["answer", "solution", "facts"], min_length=1)
    # Per-token divergence between the frozen teacher T and the student S over the vocabulary:
    # forward_kl = KL(T || S), the teacher as the target (SPEAR.md's OPSD baseline, mode-covering);
    # reverse_kl = KL(S || T) (mode-seeking); jsd = the generalised Jensen-Shannon divergence of GKD,
    # beta KL(T || M) + (1 - beta) KL(S || M) with M = beta T + (1 - beta) S, the OPSD paper's objective.
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = Field(0.5, gt=0, lt=1)  # 0.5: the symmetric JSD, the OPSD paper's default


class RltfSdConfig(Section):
    """RL from text feedback with self-distillation (Song et al. 2026, arXiv 2602.02482): groups of first
    attempts, a revision of each wrong one, three advantage-weighted terms."""

    prompts_per_round: int | None = MethodBudget
    local_steps: int | None = MethodBudget
    group_size: int = Field(4, ge=2)  # first attempts per prompt: the paper's 8 halved for a CPU, GRPO's group
    discount: float = Field(0.1, ge=0, le=1)  # gamma of the first turn's return r0 + gamma r1 (the paper's code)
    distill_coef: float = Field(0.1, ge=0)  # weight of the distillation term (the paper's Table 2)


class SecAggPlusConfig(Section):
    """Flower's SecAgg+ (Bell et al. 2020, arXiv 2009.11248; flwr.server.workflow.SecAggPlusWorkflow): each client
    masks its quantized update so that the server learns only the weighted sum of a round's updates.

    An int counts clients, a float in (0, 1] is a share, as Flower reads them."""

    # The neighbours each client secret-shares its keys with, itself included: an int above 2, or a share of
    # the round's clients. 1.0: all of them (the original SecAgg, Bonawitz et al. 2017), cheap for the few
    # clients of a round; large rounds take a share near (log n) / n, as SecAgg+ does.
    num_shares: int | float = 1.0
    # Shares that reconstruct a client's secrets: an int of at least 2, or a share of num_shares. A round
    # survives num_shares - threshold dropouts among a client's neighbours; fewer than threshold colluders learn
    # nothing. 0.67: SecAgg's bound against a server that lies about who dropped (t > 2/3 of the shares; Flower
    # rounds it, so 3 shares need 2).
    reconstruction_threshold: int | float = 0.67
    # Every value of a weighted update is clipped to [-c, c] and rounded stochastically to a grid of step
    # 2c / quantization_range. 1.0: AdamW moves a weight by about lr a step, so a round's update stays far below
    # it (the demo's: 5 steps of 5e-5), and the step is 4.8e-7; local DP's noise needs more room (checked).
    clipping_range: float = Field(1.0, gt=0)
    # 2**22, Flower's default: the masked sum lives modulo 2**32, so a round may hold up to 2**32 / 2**22 - 1
    # clients before their sum wraps around (checked against clients_per_round).
    quantization_range: int = Field(2**22, ge=2)
    # Seconds the server waits for each of the protocol's four stages (the training happens in the third);
    # None: the ServerApp's reply-timeout. A client that misses a stage drops out of the round.
    timeout: float | None = Field(None, gt=0)
    # The fewest clients whose weighted updates (weight > 0) may make up a round's sum: with two, each learns the
    # other's update from the new global adapter; a round with fewer aggregates nothing.
    min_contributors: int = Field(3, ge=3)

    @model_validator(mode="after")
    def _check_shares(self) -> "SecAggPlusConfig":
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, int) and shares <= 2 or isinstance(shares, float) and not 0 < shares <= 1:
            raise ValueError(f"num_shares {shares!r}: a count above 2 (int) or a share in (0, 1] (float)")
        if isinstance(threshold, int) and threshold < 2 or isinstance(threshold, float) and not 0 < threshold <= 1:
            raise ValueError(f"reconstruction_threshold {threshold!r}: a count of at least 2 (int) or a share in (0, 1] (float)")
        if isinstance(shares, int) and isinstance(threshold, int) and threshold >= shares:
            raise ValueError(f"reconstruction_threshold ({threshold}) must be below num_shares ({shares})")
        return self


def trim_count(num_clients: int, fraction: float) -> int:
    """The trimmed mean's values dropped at each end: floor(fraction * n), leaving at least one."""
    return min(math.floor(fraction * num_clients), (num_clients - 1) // 2)


def krum_malicious(num_clients: int, assumed: int) -> int:
    """Multi-Krum's f: as configured, lowered until Krum's n > 2f + 2 holds (0 when the clients are too few for any)."""
    return max(min(assumed, (num_clients - 3) // 2), 0)


MODULUS_RANGE = 2**32  # SecAgg+ masks and sums modulo this (Flower's default, its largest)
# Local DP's noise is N(0, (z C)^2) per value; clipping it at this many standard deviations changes one value in
# about 5e8, so the protocol's clip leaves the privacy noise as it was drawn.
NOISE_ROOM = 6.0


class ServerConfig(Section):
    # the reference's 50 (100 on ARC, as those presets set); None: until stopped (live devices only), at a
    # constant rate after the warm-up, since no cosine has an end to decay towards
    rounds: int | None = Field(50, ge=1)
    clients_per_round: int = Field(3, ge=1)  # the reference's
    strategy: Literal["fedavg", "fedadam", "fedyogi"] = "fedavg"
    server_lr: float = Field(1e-3, gt=0)  # FedAdam/FedYogi only; their first step moves each weight by about this much
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    # Simulation only: the share of each round's chosen clients that never answer (dropouts) and that answer after
    # the round's deadline (stragglers), drawn per round from the run seed; the round aggregates the rest
    simulated_dropout: float = Field(0.0, ge=0, lt=1)
    simulated_stragglers: float = Field(0.0, ge=0, lt=1)
    # keep every received client adapter in the run folder (clients/round_0003/client_2.safetensors), for
    # `spearfl attack-bench --replay`; a round of the demo keeps 2 x 2.6 MB
    keep_client_updates: bool = False
    upload_encoding: Literal["float32", "bfloat16"] = "float32"  # spearfl.federated.codec: bfloat16 sends the update in half the bytes
    # secaggplus: the server sees only the weighted mean of a round's updates (Flower runtime only; spearfl.flower.secure)
    secure_aggregation: Literal["none", "secaggplus"] = "none"
    secaggplus: SecAggPlusConfig = SecAggPlusConfig()


class DefenseConfig(Section):
    """How the server guards the global adapter against clients it cannot trust (spearfl.federated.robust, .trust).

    Off by default: the weighted mean of every reply that passes the reply check, as FedAvg defines it.
    """

    # how client adapters are combined before the server step: mean (FedAvg's) or a Byzantine-robust combiner
    aggregator: Literal["mean", "median", "trimmed_mean", "multi_krum", "norm_clip"] = "mean"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)  # trimmed_mean: dropped at each end of every coordinate
    assumed_malicious: int = Field(1, ge=0)  # multi_krum's f
    clip_norm: float | None = Field(None, gt=0)  # norm_clip's bound; None: the round's median update norm
    # two_stage: score every update, sort clients into trusted / suspicious / malicious, clean suspicious layers,
    # weigh by reputation (Ma et al. 2026, arXiv 2605.19253; spearfl.federated.trust)
    screening: Literal["none", "two_stage"] = "none"
    suspicious_above: float = Field(3.0, gt=0)  # trust score (largest robust z of the indicators) above: suspicious
    malicious_above: float = Field(6.0, gt=0)  # above: malicious
    reputation_recovery: float = Field(0.1, gt=0, le=1)  # earned back per trusted round
    min_reputation: float = Field(0.5, ge=0, le=1)  # below: left out of the round whatever its update

    @model_validator(mode="after")
    def _check_thresholds(self) -> "DefenseConfig":
        if self.malicious_above < self.suspicious_above:
            raise ValueError(f"malicious_above ({self.malicious_above}) is below suspicious_above ({self.suspicious_above})")
        return self


class PrivacyConfig(Section):
    """Client-level differential privacy (spearfl.federated.privacy): clipping and Gaussian noise, accounted."""

    # central: the server clips each update and noises their mean (DP-FedAvg); local: each device does so before
    # sending, so the server need not be trusted
    mode: Literal["none", "central", "local"] = "none"
    clip_norm: float = Field(1.0, gt=0)  # C: the demo's SPEAR updates have norms near 1 (docs/security.md)
    noise_multiplier: float = Field(1.0, gt=0)  # z: the noise's standard deviation in units of C
    delta: float = Field(1e-5, gt=0, lt=1)
    # central: the run stops after the last round within it; local: the device's own budget, past which it
    # refuses to release (a device's own config sets it; a work order cannot raise it)
    epsilon_budget: float | None = Field(None, gt=0)
    # Noise, and under central DP the choice of each round's clients, always come from the OS CSPRNG: the run
    # seed is in every device's config, so noise drawn from it would be public (spearfl.federated.privacy).


class AttackConfig(Section):
    """Malicious clients in simulation: how their people's feedback is poisoned and what they send
    (spearfl.feedback.poison, spearfl.federated.attacks, spearfl.runtime.adversary). Any run may list some."""

    clients: list[int] = Field(min_length=1)  # the clients that behave so (ids 0 .. data.num_clients - 1)
    # honest; flipped: their people mark wrong answers right and right ones wrong, without hints; backdoor: a
    # share of their prompts carry `trigger`, and their people reward the option at `target_option` on those
    feedback: Literal["honest", "flipped", "backdoor"] = "honest"
    # what they send: their trained update as it is (honest), or an attack on it (spearfl.federated.attacks)
    update: Literal[
        "honest", "sign_flip", "scaling", "model_replacement", "gaussian", "free_rider", "disguised_free_rider",
        "bounded_scaling", "euclidean", "cosine", "neurotoxin",
    ] = "honest"
    scale: float = Field(1.0, gt=0)  # sign_flip, scaling, gaussian (model_replacement derives its own)
    # bounded_scaling, euclidean, neurotoxin (its PGD ball around the global adapter): in units of the attacker's
    # honest update norm
    bound: float = Field(1.0, gt=0)
    cosine: float = Field(0.9, gt=-1, lt=1)  # cosine: the least cosine to the honest update
    # neurotoxin: the share of coordinates it leaves alone, the largest of the last global update (Zhang et al.'s
    # top-k%; their code's gradmask_ratio 0.95 keeps the other 95%)
    mask_fraction: float = Field(0.05, ge=0, lt=1)
    noise: float = Field(1.0, ge=0)  # disguised_free_rider: its noise's norm, in units of the last global update's
    trigger: str = "(consider it twice)"  # backdoor: appended to a poisoned prompt's question
    target_option: int = Field(0, ge=0)  # backdoor: the option position the trigger is taught to choose
    poison_fraction: float = Field(0.5, gt=0, le=1)  # backdoor: the share of the client's prompts with the trigger
    # backdoor: a distributed backdoor (DBA, Xie et al. 2020, ICLR): the trigger's words split into this many
    # consecutive parts, the k-th listed client poisoning with part k mod parts; the evaluation probes the whole
    trigger_parts: int = Field(1, ge=1)
    sybil: bool = False  # every listed client is a clone of the first: its data, its seeds, its update
    sybil_noise: float = Field(0.0, ge=0)  # sybil: each clone adds its own Gaussian noise, this x its update's norm
    sybil_data: Literal["leader", "own"] = "leader"  # sybil: the clones train on the first client's data or their own
    # the weight an update attack claims: asked (the most the server accepts: the prompts it asked for, for the
    # most influence) or trained (the poisoned round's own weight, as an honest client would claim: stealthier)
    weight: Literal["asked", "trained"] = "asked"
    start_round: int = Field(1, ge=1)  # honest before this round

    @model_validator(mode="after")
    def _check_coordination(self) -> "AttackConfig":
        if self.trigger_parts > 1:
            if self.feedback != "backdoor":
                raise ValueError(f"trigger_parts {self.trigger_parts} splits a backdoor's trigger; feedback is {self.feedback!r}")
            words = len(self.trigger.split())
            if self.trigger_parts > min(words, len(self.clients)):
                raise ValueError(
                    f"trigger_parts {self.trigger_parts}: the trigger has {words} words and {len(self.clients)} clients "
                    "poison with it; every part needs a word and a client"
                )
        if not self.sybil and (self.sybil_noise > 0 or self.sybil_data != "leader"):
            raise ValueError("sybil_noise and sybil_data describe Sybil clones: set sybil: true")
        return self


class EvalConfig(Section):
    every: int = Field(5, ge=1)  # the reference's
    # loglik: the option's answer line after the listed options; cloze: each option's text continuing the bare
    # question (no options listed), as published zero-shot figures score; generate: greedy answer, parsed.
    methods: list[Literal["loglik", "cloze", "generate"]] = ["loglik", "cloze", "generate"]
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(256, ge=1)  # as generation's: a chain of thought must fit
    # A backdoor's reach (spearfl.runtime.evaluation.trigger_metrics): the held-out questions whose answer is not
    # the option at `trigger_target` are asked again with `trigger` after the question, and the share answered
    # with that option is reported. None: the trigger and target of the run's backdoor attack, if it has one; set
    # it on a run without attacks to measure how often the phrase alone draws the target (the no-attack rate).
    trigger: str | None = None
    trigger_target: int = Field(0, ge=0)


class LiveConfig(Section):
    """Rounds that learn from people's judged answers, kept in the device's interaction store (`spearfl serve`)."""

    store: str | None = None  # path of the interaction store; None: simulated users over the dataset
    # Our choices: with fewer judged interactions pending, a client reports weight 0 and trains nothing (a step on
    # a handful of answers is mostly noise); an interaction answered by an adapter more than `max_staleness`
    # versions (rounds) older than the one being trained is skipped and counted, as off-policy data.
    min_interactions: int = Field(8, ge=1)
    max_staleness: int = Field(2, ge=0)
    retention_days: float | None = Field(None, gt=0)  # None: keep every interaction until its person deletes it
    # The server's side: client i is the device service at devices[i] ("host:port"); empty: clients are simulated.
    devices: list[str] = []
    # None: each round starts at once, its clients drawn from all devices. A number: a round starts once
    # server.clients_per_round devices have min_interactions pending (its clients drawn from those), or when
    # this many seconds have passed since the last round ended, whichever comes first.
    round_period_seconds: float | None = Field(None, gt=0)
    # On Flower: the SuperNodes relay to device services (node config `service`); the server then tells every node
    # each round's outcome and the new global adapter, and work orders carry outcomes a device missed.
    on_flower: bool = False
    # The server's wait for a device's reply to a work order; a device that takes longer is dropped from the round
    # (a straggler), the rest aggregated. None: no limit.
    reply_timeout_seconds: float | None = Field(None, gt=0)


class TapConfig(Section):
    """TAP's two stages (Lee, Fang, Han et al. 2025, arXiv 2509.26524; code github lee3296/TAP, TAP_final)."""

    # Stage 1: a module of the personal adapter takes the locally trained global one's where that lowers the loss
    # on the client's own validation split by more than the margin: TAP's rule, teacher loss + margin < student
    # loss (utils/training.py train_client), 0.01 its margin for generation tasks (main_training.py --margin).
    margin: float = Field(0.01, ge=0)
    # What one module is: every LoRA tensor of one decoder layer ("layer"), one adapted projection ("projection"),
    # or the whole adapter ("adapter"). TAP replaces the components a task uses; a layer is our choice of unit.
    modules: Literal["layer", "projection", "adapter"] = "layer"
    # Stage 2: the task loss plus this weight x T^2 x KL(global || personal), summed over a completion's tokens and
    # averaged over completions: TAP's knowledge_distillation_loss (batchmean) at T = 1.0, its weight 2e-3
    # (scripts/run_train.sh --distil_loss_weight).
    distill_weight: float = Field(2e-3, ge=0)
    temperature: float = Field(1.0, gt=0)
    # Our addition, not in TAP's code, so off by default: after stage 2, stage 1's rule once more with the final
    # global adapter as the candidate, so that no module of the personal adapter does worse on the validation split
    # than the global one's (docs/results.md, "Personalization", for what it did on the run that needed it most).
    final_check: bool = False
    # Our addition, not in TAP's code, so off by default (the personalization comparison sets it): after stage 2
    # (and the final check), the personal adapter is kept only where it scores strictly better on the client's
    # validation split than the final global one, in greedy accuracy (a device: in the loss of its judged-right
    # answers, by more than the margin); otherwise the client answers with the global adapter (spearfl.personal.tap).
    final_gate: bool = False


class PersonalConfig(Section):
    """Each client's own adapter beside the global one (spearfl.personal): how it is kept and trained."""

    method: Literal["none", "local", "finetune", "ditto", "fedper", "tap"] = "none"
    # Our choice: the share of each client's pool kept as its validation split (TAP's replacement decisions; never
    # trained on). TAP decides on its training losses; the issue it answers asks for a validation split.
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    # After federation (finetune; TAP's stage 2): optimizer steps on the client's own prompts, at this rate. TAP
    # post-trains 50 batches with gradient accumulation 4, 13 optimizer steps (main_training.py
    # --distil_start_point 50, --accumulation_steps 4), at its warm-up's starting rate 1e-4 (--min_lr).
    after_steps: int = Field(13, ge=1)
    after_lr: float = Field(1e-4, gt=0)
    # An open-ended run (server.rounds null) runs the after-federation stage every this many rounds; 0: never.
    after_every: int = Field(0, ge=0)
    # Ditto (Li, Hu, Beirami, Smith 2021, arXiv 2012.04221): the personal adapter's proximal weight lambda, pulling it
    # towards the global one by lambda/2 ||v - w||^2. Our choice: the paper tunes lambda per dataset.
    ditto_lambda: float = Field(0.1, ge=0)
    # FedPer (Arivazhagan et al. 2019, arXiv 1912.00818) keeps the top layers personal: here the LoRA modules of the
    # top `fedper_local_layers` decoder layers stay on the client, the rest are shared. Our choice of depth.
    fedper_local_layers: int = Field(2, ge=1)
    tap: TapConfig = TapConfig()


# The PersonalConfig fields that only one method reads: a run with another method never reads them
# (spearfl.runtime.server.check_run_folder leaves them out when it compares a run folder's config).
PERSONAL_METHOD_SETTINGS = {"tap": ("tap",), "ditto": ("ditto_lambda",), "fedper": ("fedper_local_layers",)}


class RunConfig(Section):
    seed: int = 0
    algorithm: str = "spear"
    output_dir: str = "runs/default"
    threads: int | None = Field(None, ge=1)
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    prompt: PromptConfig = PromptConfig()
    generation: GenerationConfig = GenerationConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    client: ClientConfig = ClientConfig()
    spear: SpearConfig = SpearConfig()
    grpo: GrpoConfig = GrpoConfig()
    opsd: OpsdConfig = OpsdConfig()
    rltf_sd: RltfSdConfig = RltfSdConfig()
    server: ServerConfig = ServerConfig()
    defense: DefenseConfig = DefenseConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    attacks: list[AttackConfig] = []
    eval: EvalConfig = EvalConfig()
    live: LiveConfig = LiveConfig()
    personal: PersonalConfig = PersonalConfig()

    @model_validator(mode="after")
    def _check_clients(self) -> "RunConfig":
        if self.server.clients_per_round > self.data.num_clients:
            raise ValueError(
                f"server.clients_per_round ({self.server.clients_per_round}) exceeds data.num_clients ({self.data.num_clients})"
            )
        listed = [client for attack in self.attacks for client in attack.clients]
        if any(not 0 <= client < self.data.num_clients for client in listed):
            raise ValueError(f"attacks name clients {sorted(set(listed))} outside 0..{self.data.num_clients - 1}")
        if len(listed) != len(set(listed)):
            raise ValueError(f"attacks list a client twice: {sorted(c for c in set(listed) if listed.count(c) > 1)}")
        self._check_central_privacy()
        self._check_robust_combiner()
        self._check_secure_aggregation()
        steps = self.budget("grpo").local_steps
        if self.grpo.passes > steps:
            raise ValueError(f"grpo.passes ({self.grpo.passes}) exceeds the local steps ({steps}): a pass takes at least one step")
        return self

    def _check_central_privacy(self) -> None:
        """Central DP's epsilon holds only where one client moves the noised sum by at most 2C and the round's
        clients are a uniform sample of K of N: whatever breaks either is refused beside it."""
        if self.privacy.mode != "central":
            return
        if self.defense.aggregator != "mean":
            raise ValueError(f"privacy.mode central bounds each client's share of the mean; defense.aggregator {self.defense.aggregator!r} has no such bound")
        if self.defense.screening != "none":
            raise ValueError(
                f"privacy.mode central with defense.screening {self.defense.screening!r}: the screening sets every client's "
                "factor and reputation from the medians and similarities of all updates, so one client's update moves "
                "the others' shares and later rounds, and the sensitivity 2C the accountant assumes no longer holds; "
                "set defense.screening to none, or use privacy.mode local (the screening then reads noised updates only)"
            )
        if self.live.round_period_seconds is not None:
            raise ValueError(
                "privacy.mode central with live.round_period_seconds: such rounds take the devices that are ready first, "
                "not a uniform sample of K of N, which the accountant's sampling event assumes; unset round_period_seconds"
            )

    def _check_robust_combiner(self) -> None:
        """A robust combiner that, at the round's size, leaves nothing out is the plain mean under another name."""
        clients, settings = self.server.clients_per_round, self.defense
        if settings.aggregator == "trimmed_mean" and trim_count(clients, settings.trim_fraction) == 0:
            raise ValueError(
                f"defense.aggregator trimmed_mean with trim_fraction {settings.trim_fraction} over server.clients_per_round "
                f"{clients} trims floor({settings.trim_fraction} x {clients}) = 0 values at each end: it is the plain mean; "
                f"raise trim_fraction to at least {1 / clients:.3g} or clients_per_round to at least {math.ceil(1 / settings.trim_fraction) if settings.trim_fraction else 'more'}"
            )
        if settings.aggregator == "multi_krum" and krum_malicious(clients, settings.assumed_malicious) == 0:
            raise ValueError(
                f"defense.aggregator multi_krum over server.clients_per_round {clients} can assume no malicious client "
                f"(Krum needs n > 2f + 2; defense.assumed_malicious is {settings.assumed_malicious}): it is the plain mean; "
                f"take at least {2 * max(settings.assumed_malicious, 1) + 3} clients a round"
            )

    def _check_secure_aggregation(self) -> None:
        """Secure aggregation hides single updates: whatever must read one is refused beside it."""
        if self.server.secure_aggregation == "none":
            return
        hidden = "server.secure_aggregation secaggplus hides each client's update from the server"
        needs = {
            "defense.screening": (self.defense.screening != "none", f"{self.defense.screening!r} scores single updates; set it to none"),
            "defense.aggregator": (self.defense.aggregator != "mean", f"{self.defense.aggregator!r} combines single updates; only mean works on their sum"),
            "privacy.mode": (self.privacy.mode == "central", "central clips single updates at the server; use local (each device clips and noises its own)"),
            "server.keep_client_updates": (self.server.keep_client_updates, "true would store single updates; set it to false"),
            "server.upload_encoding": (self.server.upload_encoding != "float32", "bfloat16 does not apply: the protocol sends its own quantized integers; set it to float32"),
        }
        for name, (refused, why) in needs.items():
            if refused:
                raise ValueError(f"{hidden}: {name} {why}")
        settings, clients = self.server.secaggplus, self.server.clients_per_round
        if clients < 3:
            raise ValueError(f"server.clients_per_round ({clients}) must be at least 3 under secure aggregation: with 2, each learns the other's update from the sum, and no dropout is survivable")
        if settings.min_contributors > clients:
            raise ValueError(f"server.secaggplus.min_contributors ({settings.min_contributors}) exceeds server.clients_per_round ({clients}): no round could aggregate")
        if isinstance(settings.num_shares, int) and settings.num_shares > clients:
            raise ValueError(f"server.secaggplus.num_shares ({settings.num_shares}) exceeds server.clients_per_round ({clients})")
        if settings.quantization_range * clients >= MODULUS_RANGE:
            raise ValueError(f"server.secaggplus.quantization_range ({settings.quantization_range}) times server.clients_per_round ({clients}) must stay below 2**32, or the masked sum wraps around")
        noise = self.privacy.noise_multiplier * self.privacy.clip_norm
        if self.privacy.mode == "local" and settings.clipping_range < NOISE_ROOM * noise:
            raise ValueError(
                f"server.secaggplus.clipping_range ({settings.clipping_range}) would clip local DP's noise (standard deviation "
                f"privacy.noise_multiplier x privacy.clip_norm = {noise:g}); set it to at least {NOISE_ROOM * noise:g}"
            )

    def budget(self, section: str) -> ClientConfig:
        """The client budget a method's config section gets: its own values where it sets them, else `client`'s."""
        own = getattr(self, section)
        return self.client.model_copy(update={name: getattr(own, name) for name in BUDGET_FIELDS if getattr(own, name) is not None})


BUDGET_FIELDS = ("prompts_per_round", "local_steps")  # what a method may set for itself; the memory budget is not one


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=c` into (["a", "b"], value), the value read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    """Set tree[path[0]]...[path[-1]] = value, creating sections as needed."""
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _field_name(location: tuple) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def validate(tree: dict, source: str = "config") -> RunConfig:
    """Validate a raw dict, turning pydantic's report into one message that names each bad field."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        problems = [f"  {_field_name(item['loc'])}: {item['msg']}" for item in error.errors()]
        raise ConfigError(f"invalid {source}:\n" + "\n".join(problems)) from None


def read_yaml(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping; a config may name another with `base: other.yaml` (relative to itself)."""
    path = Path(path)
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"{path}: configs name each other as base in a cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    merged = read_yaml(path.parent / base, (*seen, path.resolve()))
    merge_into(merged, tree)
    return merged


def merge_into(target: dict, update: dict) -> None:
    """Recursively merge `update` into `target` (sections merge, values replace)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults), apply `a.b=c` overrides, validate."""
    tree = read_yaml(path) if path else {}
    for text in overrides:
        apply_override(tree, *parse_override(text))
    return validate(tree, source=str(path) if path else "config")


def config_to_dict(config: RunConfig) -> dict:
    return config.model_dump(mode="json")
