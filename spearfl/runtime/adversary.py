"""Malicious clients in simulation: a client's round as its attack config (`attacks` in the run config) says it
behaves, around the honest client update every runtime runs.

- feedback "flipped" or "backdoor": the round trains with poisoned feedback (spearfl.feedback.poison);
- update other than "honest": the client also trains honestly, as a real attacker can on its own data, and sends
  the attack of its poisoned update with its honest one as the reference (spearfl.federated.attacks), claiming
  the full weight the server allows (the prompts it asked for), or with `weight: trained` the poisoned round's
  own weight, as an honest client would;
- sybil: every listed client acts as the first one (its examples and seeds), so the clones send one update.
The runtimes call `acting_client` where they pick a client's examples, and `behave` in place of the update.
"""

from __future__ import annotations

import dataclasses

import torch

from spearfl.algorithms import CONFIG_SECTIONS
from spearfl.algorithms.base import ClientContext, ClientResult, ClientRound, ClientUpdate
from spearfl.config import AttackConfig, RunConfig
from spearfl.federated.attacks import UPDATE_ATTACKS
from spearfl.feedback.poison import flipped, with_backdoor
from spearfl.seeds import derive_seed


def attack_of(config: RunConfig, client: int) -> AttackConfig | None:
    """The attack a client follows, if any."""
    return next((attack for attack in config.attacks if client in attack.clients), None)


def backdoor_probe(config: RunConfig) -> tuple[str, int] | None:
    """The trigger phrase and target option the held-out evaluation probes: `eval.trigger`, else the run's
    backdoor attack's, else none."""
    if config.eval.trigger is not None:
        return config.eval.trigger, config.eval.trigger_target
    backdoor = next((attack for attack in config.attacks if attack.feedback == "backdoor"), None)
    return None if backdoor is None else (backdoor.trigger, backdoor.target_option)


def acting_client(config: RunConfig, client: int) -> int:
    """Whose examples and seeds a client uses: a sybil clone's are its leader's, everyone else's their own."""
    attack = attack_of(config, client)
    return attack.clients[0] if attack is not None and attack.sybil else client


def poisoned(context: ClientContext, work: ClientRound, attack: AttackConfig) -> tuple[ClientContext, ClientRound]:
    """The context and work order with the attack's feedback poisoning."""
    if attack.feedback == "flipped":
        return dataclasses.replace(context, feedback=flipped(context.feedback)), work
    seed = derive_seed(work.run_seed, 0, work.client_id, "backdoor")  # round 0's: the same prompts every round
    examples = with_backdoor(work.examples, attack.trigger, attack.target_option, attack.poison_fraction, seed)
    return context, dataclasses.replace(work, examples=examples)


def behave(update: ClientUpdate, context: ClientContext, work: ClientRound) -> ClientResult:
    """The client's round: the honest update, or what its attack makes of it."""
    attack = attack_of(context.config, work.client_id)
    if attack is None or work.round_index < attack.start_round:
        return update(context, work)
    poisoned_result = update(*poisoned(context, work, attack)) if attack.feedback != "honest" else None
    if attack.update == "honest":
        return poisoned_result
    honest_result = update(context, work)
    poisoned_result = poisoned_result or honest_result
    delta = {name: poisoned_result.state[name] - work.global_state[name] for name in work.global_state}
    reference = {name: honest_result.state[name] - work.global_state[name] for name in work.global_state}
    generator = torch.Generator().manual_seed(work.seed("attack"))
    sent = UPDATE_ATTACKS[attack.update](delta, reference, attack, generator)
    state = {name: work.global_state[name] + sent[name].to(work.global_state[name].dtype) for name in work.global_state}
    asked = context.config.budget(CONFIG_SECTIONS[context.config.algorithm]).prompts_per_round
    weight = float(asked) if attack.weight == "asked" else poisoned_result.weight
    return ClientResult(state, weight, poisoned_result.metrics)
