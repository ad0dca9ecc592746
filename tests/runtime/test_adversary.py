"""Malicious clients in simulation, and the server's screening of them, on the primed tiny model."""

import json

import pytest
import torch
from helpers import end_to_end_assets, multiple_choice, read_history, single_thread, write_run_config

from spearfl.algorithms import ALGORITHMS
from spearfl.algorithms.base import ClientContext, ClientResult, ClientRound
from spearfl.config import load_config
from spearfl.feedback.poison import flipped, triggered, with_backdoor
from spearfl.feedback.providers import Feedback
from spearfl.runtime.adversary import acting_client, behave
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
    assert len(seen) == 2 and seen[0][0] is not ORACLE and seen[1][0] is ORACLE  # poisoned, then honest training
    assert result.state["w"].tolist() == [10.0 + 3 * 2.0]  # 3 x the poisoned update
    assert result.weight == config.client.prompts_per_round


def test_a_stealthy_attacker_claims_the_weight_its_round_earned(tmp_path):
    config = config_for(tmp_path, 'attacks=[{clients: [1], feedback: backdoor, update: neurotoxin, weight: trained}]')
    result = behave(stub_update([]), Context(config), work_for(1))
    assert result.weight == 3.0 != config.client.prompts_per_round


def test_an_attack_waits_for_its_start_round(tmp_path):
    config = config_for(tmp_path, 'attacks=[{clients: [1], update: sign_flip, start_round: 2}]')
    assert behave(stub_update([]), Context(config), work_for(1)).state["w"].tolist() == [11.0]


def test_sybil_clones_send_their_leaders_update(tmp_path):
    config = config_for(tmp_path, "server.rounds=1", "server.clients_per_round=3", 'attacks=[{clients: [1, 2], sybil: true, update: sign_flip}]')
    assert [acting_client(config, client) for client in range(3)] == [0, 1, 1]
    context = build_context(config)
    replies = InProcessClients(context, prepare_data(config), None).train(1, [0, 1, 2], {**context_state(context)}, 0.01)
    (_, honest), (_, first), (_, clone) = replies.results
    assert all(torch.equal(first.state[name], clone.state[name]) for name in first.state)
    assert any(not torch.equal(first.state[name], honest.state[name]) for name in first.state)


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
