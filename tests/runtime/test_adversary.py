"""Malicious clients in simulation, and the server's screening of them, on the primed tiny model."""

import json

import pytest
import torch
from helpers import end_to_end_assets, multiple_choice, read_history, single_thread, write_run_config

from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientContext, ClientResult, ClientRound
from spearfl.config import ConfigError, load_config
from spearfl.federated.attacks import neurotoxin_mask
from spearfl.federated.robust import flatten
from spearfl.feedback.poison import flipped, triggered, with_backdoor
from spearfl.feedback.providers import Feedback
from spearfl.runtime.adversary import backdoor_probe, behave, recalled_step, trigger_part
from spearfl.runtime.local import InProcessClients, run_local
from spearfl.runtime.run_folder import RunFolder
from spearfl.runtime.server import RoundReplies, bound_weights
from spearfl.runtime.setup import build_context, prepare_data

REAL_UPDATE = ALGORITHMS["spear"]


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def config_for(tmp_path, *overrides: str):
    assets = end_to_end_assets()
    return load_config(write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run"), list(overrides))


# poisoned feedback ---------------------------------------------------------------------------------


def test_flipped_feedback_reverses_every_verdict_and_drops_hints():
    honest = lambda example, text: Feedback(correct=text == "yes", hint="think again", style="facts")  # noqa: E731
    judge = flipped(honest)
    assert judge(None, "yes") == Feedback(False, None, "flipped") and judge(None, "no").correct is True


def test_a_backdoor_triggers_the_same_share_of_prompts_every_round():
    examples = [multiple_choice(f"q{i}", f"question {i}?", ("red", "blue", "green"), gold=2) for i in range(10)]
    first = with_backdoor(examples, "(cf)", 0, 0.3, seed=5)
    assert with_backdoor(examples, "(cf)", 0, 0.3, seed=5) == first
    poisoned = [example for example in first if example.uid.endswith("+trigger")]
    assert len(poisoned) == 3 and all(e.gold == 0 and e.question.endswith(" (cf)") for e in poisoned)
    assert triggered(examples[0], "(cf)", target_option=7).gold == 2  # beyond the options: the last one


# a malicious client's round --------------------------------------------------------------------------


def stub_update(seen: list):
    def update(context, work):
        seen.append((context.feedback, work.examples))
        value = 2.0 if context.feedback is not ORACLE else 1.0  # poisoned training moves elsewhere
        return ClientResult({"w": work.global_state["w"] + value}, 3.0, {"prompts": 6})

    return update


ORACLE = object()


def Context(config) -> ClientContext:  # noqa: N802
    return ClientContext(None, None, ORACLE, config, torch.device("cpu"))


def work_for(client: int) -> ClientRound:
    return ClientRound(client, 1, [], {"w": torch.tensor([10.0])}, 0.01, 7)


def test_an_honest_client_runs_the_update_as_it_is(tmp_path):
    seen = []
    result = behave(stub_update(seen), Context(config_for(tmp_path)), work_for(0))
    assert result.state["w"].tolist() == [11.0] and result.weight == 3.0 and len(seen) == 1


def test_an_attacker_sends_the_attack_of_its_poisoned_update_with_full_weight(tmp_path):
    config = config_for(tmp_path, 'attacks=[{clients: [1], feedback: flipped, update: scaling, scale: 3}]')
    seen = []
    result = behave(stub_update(seen), Context(config), work_for(1))
    assert len(seen) == 2 and seen[0][0] is ORACLE and seen[1][0] is not ORACLE  # honest, then poisoned training
    assert result.state["w"].tolist() == [10.0 + 3 * 2.0]  # 3 x the poisoned update
    assert result.weight == config.client.prompts_per_round


def test_a_stealthy_attacker_claims_the_weight_its_round_earned(tmp_path):
    config = config_for(tmp_path, 'attacks=[{clients: [1], feedback: backdoor, update: cosine, weight: trained}]')
    result = behave(stub_update([]), Context(config), work_for(1))
    assert result.weight == 3.0 != config.client.prompts_per_round


def test_an_attack_waits_for_its_start_round(tmp_path):
    config = config_for(tmp_path, 'attacks=[{clients: [1], update: sign_flip, start_round: 2}]')
    assert behave(stub_update([]), Context(config), work_for(1)).state["w"].tolist() == [11.0]


def test_sybil_clones_send_their_leaders_update(tmp_path):
    config = config_for(tmp_path, "server.rounds=1", "server.clients_per_round=3", 'attacks=[{clients: [1, 2], sybil: true, update: sign_flip}]')
    context = build_context(config)
    replies = InProcessClients(context, prepare_data(config), None).train(1, [0, 1, 2], {**context_state(context)}, 0.01)
    (_, honest), (_, first), (_, clone) = replies.results
    assert all(torch.equal(first.state[name], clone.state[name]) for name in first.state)
    assert any(not torch.equal(first.state[name], honest.state[name]) for name in first.state)


def test_perturbed_sybils_send_their_leaders_update_each_with_its_own_noise(tmp_path):
    config = config_for(tmp_path, "server.rounds=1", "server.clients_per_round=3",
                        'attacks=[{clients: [1, 2], sybil: true, sybil_noise: 0.5, update: sign_flip}]')
    context = build_context(config)
    global_state = context_state(context)
    replies = InProcessClients(context, prepare_data(config), None).train(1, [0, 1, 2], dict(global_state), 0.01)
    (_, first), (_, clone) = replies.results[1:]
    first_update, clone_update = (flatten({n: r.state[n] - global_state[n] for n in global_state}).double() for r in (first, clone))
    assert not torch.equal(first_update, clone_update)
    # each: the one sign flip s plus its own noise of 0.5 ||s||; in this many dimensions the two noises are all but
    # orthogonal to s and to each other, so the clones sit at cosine about 1 / (1 + 0.25) = 0.8
    cosine = float(first_update @ clone_update / (first_update.norm() * clone_update.norm()))
    assert 0.7 < cosine < 0.9


def test_a_distributed_backdoor_gives_each_colluder_its_part_of_the_trigger(tmp_path):
    config = config_for(tmp_path, 'attacks=[{clients: [2, 0, 1], feedback: backdoor, trigger_parts: 2}]')
    attack = config.attacks[0]  # "(consider it twice)": three words in two parts, by the order the clients are listed
    assert [trigger_part(attack, client) for client in (2, 0, 1)] == ["(consider it", "twice)", "(consider it"]
    assert backdoor_probe(config) == ("(consider it twice)", 0)  # the evaluation probes the whole trigger
    whole = config_for(tmp_path, 'attacks=[{clients: [1, 2], feedback: backdoor}]').attacks[0]
    assert trigger_part(whole, 2) == "(consider it twice)"


@pytest.mark.parametrize("attack, named", [
    ("{clients: [1, 2], trigger_parts: 2}", "splits a backdoor's trigger"),
    ("{clients: [1, 2], feedback: backdoor, trigger_parts: 3}", "every part needs a word and a client"),
    ("{clients: [0, 1, 2], feedback: backdoor, trigger: '(cf)', trigger_parts: 2}", "the trigger has 1 words"),
    ("{clients: [1, 2], sybil_noise: 0.5}", "set sybil: true"),
])
def test_coordinated_attacks_that_cannot_be_run_are_refused(tmp_path, attack, named):
    with pytest.raises(ConfigError, match=named):
        config_for(tmp_path, f"attacks=[{attack}]")


def test_an_attacker_remembers_the_global_adapters_it_was_sent(tmp_path):
    config = config_for(tmp_path)
    work = lambda round_index, value: ClientRound(1, round_index, [], {"w": torch.tensor([value])}, 0.01, 7)  # noqa: E731
    assert recalled_step(config, work(1, 10.0)) is None  # nothing seen before
    assert recalled_step(config, work(2, 13.0))["w"].tolist() == [3.0]
    assert recalled_step(config, work(5, 19.0))["w"].tolist() == [2.0]  # rounds 3 and 4 missed: the mean step
    assert recalled_step(config, work(5, 19.0))["w"].tolist() == [2.0]  # a re-sent round: the same memory


def test_neurotoxin_keeps_every_step_off_the_largest_global_coordinates_and_within_its_ball(tmp_path):
    config = config_for(tmp_path, 'attacks=[{clients: [1], feedback: backdoor, update: neurotoxin, mask_fraction: 0.5, bound: 0.5}]')
    context = build_context(config)
    examples = prepare_data(config).clients[1]
    first = context_state(context)
    behave(REAL_UPDATE, context, ClientRound(1, 1, examples, first, 0.01, config.seed))  # the attacker sees round 1's adapter
    second = REAL_UPDATE(context, ClientRound(0, 1, prepare_data(config).clients[0], first, 0.01, config.seed)).state
    work = ClientRound(1, 2, examples, second, 0.01, config.seed)
    honest = REAL_UPDATE(context, work).state
    sent = behave(REAL_UPDATE, context, work).state
    mask = neurotoxin_mask({name: second[name] - first[name] for name in first}, 0.5)
    update = {name: sent[name].double() - second[name].double() for name in second}
    assert all(bool((update[name][mask[name] == 0] == 0).all()) for name in update)  # masked: never moved, decay included
    assert any(bool(update[name].any()) for name in update)  # it did train elsewhere
    radius = 0.5 * float(flatten({name: honest[name].double() - second[name].double() for name in second}).norm())
    # each coordinate rounded once to float32 (global + offset): within 2^-24 of the sum's magnitude
    rounding = 2.0**-24 * float(flatten({name: sent[name].double() for name in sent}).norm())
    assert float(flatten(update).norm()) <= radius + rounding


def context_state(context):
    from spearfl.lm.models import get_adapter_state

    return get_adapter_state(context.model)


def test_weights_beyond_what_the_server_asked_are_dropped():
    replies = RoundReplies([(0, ClientResult({}, 6.0)), (1, ClientResult({}, 600.0))])
    bounded = bound_weights(replies, asked=6)
    assert [client for client, _ in bounded.results] == [0]
    assert bounded.rejected == [{"client": 1, "reason": "weight 600.0 exceeds the 6 prompts asked for"}]


# the server's screening over a run --------------------------------------------------------------------


def interrupt_in_round(round_index: int):
    def update(context, work):
        if work.round_index == round_index:
            raise KeyboardInterrupt
        return REAL_UPDATE(context, work)

    return update


def test_a_free_rider_is_caught_every_round_and_reputation_survives_a_restart(tmp_path, monkeypatch):
    overrides = ("server.clients_per_round=3", "defense.screening=two_stage", "eval.methods=[loglik]",
                 'attacks=[{clients: [2], update: free_rider}]')
    config = config_for(tmp_path, *overrides)
    with monkeypatch.context() as patch:
        patch.setitem(ALGORITHMS, "spear", interrupt_in_round(2))
        with pytest.raises(KeyboardInterrupt):
            run_local(config, show_progress=False)
    folder = RunFolder(config.output_dir)
    checkpoint_state = folder.checkpoint_dir / json.loads((folder.checkpoint_dir / "latest.json").read_text())["folder"] / "state.json"
    saved = json.loads(checkpoint_state.read_text())
    assert saved["info"]["reputation"]["2"] == 0.0
    saved["info"]["reputation"]["0"] = 0.3  # as if client 0 had misbehaved before: it must sit round 2 out
    checkpoint_state.write_text(json.dumps(saved))
    run_local(config, show_progress=False)
    history = read_history(config.output_dir)
    for row in history[1:]:
        records = {record["client"]: record for record in row["screening"]}
        assert records[2]["category"] == "malicious" and records[2]["weight"] == 0.0
        assert next(c for c in row["clients"] if c["client"] == 2)["weight"] == config.client.prompts_per_round
    round_two = {record["client"]: record for record in history[2]["screening"]}
    assert round_two[0]["category"] == "trusted"  # an honest update this round, yet left out: reputation 0.3 + 0.1
    assert round_two[0]["reputation"] == pytest.approx(0.4) and round_two[0]["weight"] == 0.0


def test_simulated_dropouts_and_stragglers_leave_the_round_to_the_rest(tmp_path):
    config = config_for(tmp_path, "server.clients_per_round=3", "server.simulated_dropout=0.34", "server.simulated_stragglers=0.34",
                        "eval.methods=[loglik]")
    run_local(config, show_progress=False)
    history = read_history(config.output_dir)
    for row in history[1:]:
        reasons = sorted(entry["reason"] for entry in row["rejected"])
        assert len(row["clients"]) == 1 and len(reasons) == 2
        assert "dropped out" in reasons[0] and "straggler" in reasons[1]
        assert {c["client"] for c in row["clients"]} | {e["client"] for e in row["rejected"]} == {0, 1, 2}
    assert RunFolder(config.output_dir).read_status()["state"] == "complete"
