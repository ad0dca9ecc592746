"""Malicious clients in simulation: a client's round as its attack config (`attacks` in the run config) says it
behaves, around the honest client update every runtime runs.

- feedback "flipped" or "backdoor": the round trains with poisoned feedback (spearfl.feedback.poison); with
  `trigger_parts` > 1 each colluder's backdoor carries its own part of the trigger (DBA, Xie et al. 2020);
- update other than "honest": the client also trains honestly, as a real attacker can on its own data, and sends
  the attack of its poisoned update (spearfl.federated.attacks) knowing its honest update, the last global update
  it saw and the weights of the round, claiming the full weight the server allows (the prompts it asked for), or
  with `weight: trained` the poisoned round's own weight, as an honest client would;
- neurotoxin: the poisoned training itself is constrained, every step (`NeurotoxinConstraint`);
- sybil: every listed client runs the first one's round (its examples and seeds, unless `sybil_data: own`), and
  each adds its own noise (`sybil_noise`), so the clones send one update or near copies of it.
The last global update comes from the attacker's memory: every global adapter it is sent is kept in
OUTPUT_DIR/adversary/client_<id>/, so it survives a restart and is the same in the local runtime and a client
worker. Where it missed rounds, the mean step since the last adapter it saw stands in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from spearfl.algorithms import CONFIG_SECTIONS
from spearfl.algorithms.base import ClientContext, ClientResult, ClientRound, ClientUpdate
from spearfl.config import AttackConfig, RunConfig
from spearfl.federated.attacks import UPDATE_ATTACKS, AttackerView, neurotoxin_mask, perturbed, projected
from spearfl.federated.robust import AdapterState, flatten
from spearfl.feedback.poison import flipped, with_backdoor
from spearfl.io import load_tensors, save_tensors
from spearfl.lm.models import lora_parameters
from spearfl.runtime.setup import prepare_data
from spearfl.seeds import derive_seed

REMEMBERING = ("disguised_free_rider", "neurotoxin")  # the attacks that use the last global update


def attack_of(config: RunConfig, client: int) -> AttackConfig | None:
    """The attack a client follows, if any."""
    return next((attack for attack in config.attacks if client in attack.clients), None)


def backdoor_probe(config: RunConfig) -> tuple[str, int] | None:
    """The trigger phrase and target option the held-out evaluation probes: `eval.trigger`, else the run's
    backdoor attack's, else none. A distributed backdoor is probed with its whole trigger."""
    if config.eval.trigger is not None:
        return config.eval.trigger, config.eval.trigger_target
    backdoor = next((attack for attack in config.attacks if attack.feedback == "backdoor"), None)
    return None if backdoor is None else (backdoor.trigger, backdoor.target_option)


def trigger_part(attack: AttackConfig, client: int) -> str:
    """The trigger a colluder poisons with: under DBA the (k mod parts)-th run of the trigger's words for the k-th
    listed client, else the whole trigger."""
    words = attack.trigger.split()
    part = attack.clients.index(client) % attack.trigger_parts
    return " ".join(np.array_split(np.array(words, dtype=object), attack.trigger_parts)[part])


def poisoned(context: ClientContext, work: ClientRound, attack: AttackConfig, sender: int) -> tuple[ClientContext, ClientRound]:
    """The context and work order with the attack's feedback poisoning (none for honest feedback)."""
    if attack.feedback == "honest":
        return context, work
    if attack.feedback == "flipped":
        return dataclasses.replace(context, feedback=flipped(context.feedback)), work
    seed = derive_seed(work.run_seed, 0, work.client_id, "backdoor")  # round 0's: the same prompts every round
    trigger = trigger_part(attack, sender)
    examples = with_backdoor(work.examples, trigger, attack.target_option, attack.poison_fraction, seed)
    return context, dataclasses.replace(work, examples=examples)


def as_leader(config: RunConfig, attack: AttackConfig, work: ClientRound) -> ClientRound:
    """A Sybil clone's round on its leader's examples and seeds; anyone else's as it is."""
    leader = attack.clients[0]
    if not attack.sybil or attack.sybil_data == "own" or work.client_id == leader:
        return work
    return dataclasses.replace(work, client_id=leader, examples=prepare_data(config).clients[leader])


def memory_folder(config: RunConfig, client: int) -> Path:
    return Path(config.output_dir) / "adversary" / f"client_{client}"


def recalled_step(config: RunConfig, work: ClientRound) -> AdapterState | None:
    """Keep this round's global adapter; return the last global update seen before it, None before any.

    (this adapter - the latest one kept from an earlier round) / the rounds between them."""
    folder = memory_folder(config, work.client_id)
    save_tensors(folder / f"round_{work.round_index:04d}.safetensors", work.global_state)
    earlier = [int(path.stem.split("_")[1]) for path in folder.glob("round_*.safetensors")]
    earlier = [round_index for round_index in earlier if round_index < work.round_index]
    if not earlier:
        return None
    last = max(earlier)
    previous = load_tensors(folder / f"round_{last:04d}.safetensors")
    return {name: (work.global_state[name] - previous[name]) / (work.round_index - last) for name in work.global_state}


class NeurotoxinConstraint:
    """Neurotoxin around every optimizer step (Zhang et al. 2022, arXiv 2206.10341, Algorithm 1): the gradient
    projected onto the coordinates outside the top-k of the last global update, and after the step the adapter
    projected back within an L2 ball of `radius` around the global adapter (projected gradient descent).

    The parameters are masked too, after the step: AdamW's decoupled weight decay would move a coordinate whose
    gradient is zero."""

    def __init__(self, model, global_state: AdapterState, mask: AdapterState, radius: float):
        self.parameters = lora_parameters(model)
        device = next(iter(self.parameters.values())).device
        self.global_state = {name: global_state[name].to(device) for name in self.parameters}
        self.mask = {name: mask[name].to(device) for name in self.parameters}
        self.radius = radius

    def project_gradients(self) -> None:
        for name, parameter in self.parameters.items():
            if parameter.grad is not None:
                parameter.grad.mul_(self.mask[name].to(parameter.grad.dtype))

    def project_parameters(self) -> None:
        with torch.no_grad():
            offset = {name: parameter.detach().double() - self.global_state[name].double() for name, parameter in self.parameters.items()}
            inside = projected(offset, self.mask, self.radius)
            for name, parameter in self.parameters.items():
                parameter.copy_(self.global_state[name].double() + inside[name])


def delta(state: AdapterState, global_state: AdapterState) -> AdapterState:
    return {name: state[name] - global_state[name] for name in global_state}


def norm(update: AdapterState) -> float:
    return float(flatten(update).double().norm())


def attacked(update: ClientUpdate, context: ClientContext, work: ClientRound, attack: AttackConfig, sender: int,
             global_step: AdapterState | None) -> tuple[AdapterState, float, dict]:
    """(the update sent, the weight claimed, the metrics reported) of an attacker's round."""
    config = context.config
    if attack.update == "honest":
        result = update(*poisoned(context, work, attack, sender))
        return delta(result.state, work.global_state), result.weight, result.metrics
    honest = update(context, work)
    reference = delta(honest.state, work.global_state)
    if attack.update == "neurotoxin":
        # with no global update seen yet, its own honest update is its estimate of the benign one (the public code's)
        mask = neurotoxin_mask(global_step if global_step is not None else reference, attack.mask_fraction)
        constraint = NeurotoxinConstraint(context.model, work.global_state, mask, attack.bound * norm(reference))
        result = update(*poisoned(dataclasses.replace(context, step_constraint=constraint), work, attack, sender))
    else:
        result = update(*poisoned(context, work, attack, sender)) if attack.feedback != "honest" else honest
    asked = config.budget(CONFIG_SECTIONS[config.algorithm]).prompts_per_round
    weight = float(asked) if attack.weight == "asked" else result.weight
    sent = delta(result.state, work.global_state)
    if attack.update != "neurotoxin" and weight > 0:
        # the others claim at most the prompts the server asks for (it drops more): the round's weight at most
        view = AttackerView(reference, global_step, weight, weight + (config.server.clients_per_round - 1) * asked)
        generator = torch.Generator().manual_seed(derive_seed(work.run_seed, work.round_index, sender, "attack"))
        sent = UPDATE_ATTACKS[attack.update](sent, view, attack, generator)
    return sent, weight, result.metrics


def behave(update: ClientUpdate, context: ClientContext, work: ClientRound) -> ClientResult:
    """The client's round: the honest update, or what its attack makes of it."""
    config, sender = context.config, work.client_id
    attack = attack_of(config, sender)
    if attack is None:
        return update(context, work)
    global_step = recalled_step(config, work) if attack.update in REMEMBERING else None
    if work.round_index < attack.start_round:
        return update(context, work)
    sent, weight, metrics = attacked(update, context, as_leader(config, attack, work), attack, sender, global_step)
    if attack.sybil_noise > 0:
        generator = torch.Generator().manual_seed(derive_seed(work.run_seed, work.round_index, sender, "sybil-noise"))
        sent = perturbed(sent, attack.sybil_noise, generator)
    state = {name: work.global_state[name] + sent[name].to(work.global_state[name].dtype) for name in work.global_state}
    return ClientResult(state, weight, metrics)
