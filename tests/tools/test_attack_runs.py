"""The attack bench's end-to-end runs: the plan of runs, the figures read back from their histories, and a
small federation on the primed tiny model run through it."""

import pytest
from helpers import end_to_end_assets, multiple_choice, single_thread, write_run_config

from spearfl.config import AttackConfig, EvalConfig, load_config
from spearfl.runtime import evaluation
from spearfl.runtime.adversary import backdoor_probe
from spearfl.tools.attack_runs import attack_runs, detection, malicious_clients, plan, with_references


@pytest.fixture
def config(tmp_path):
    assets = end_to_end_assets()
    overrides = ["data.num_clients=5", "data.min_per_client=4", "server.clients_per_round=5", "eval.methods=[loglik]"]
    return load_config(write_run_config(assets, tmp_path / "run.yaml", tmp_path / "unused"), overrides)


def test_the_plan_runs_each_attack_under_each_defense_and_the_attack_free_run_once_per_defense(config, tmp_path):
    planned = plan(config, ["backdoor_replacement", "sign_flip"], [0.2], ["mean", "two_stage"], tmp_path)
    names = [run.config.output_dir.rsplit("/", 1)[1] for run in planned]
    assert names == [
        "none-0pct-mean", "backdoor_replacement-20pct-mean", "sign_flip-20pct-mean",
        "none-0pct-two_stage", "backdoor_replacement-20pct-two_stage", "sign_flip-20pct-two_stage",
    ]
    chosen = malicious_clients(config, 0.2)
    assert len(chosen) == 1
    for run in planned:
        assert run.config.eval.trigger == "(consider it twice)"  # every run probes the same trigger
        assert run.config.defense.screening == ("two_stage" if run.defense == "two_stage" else "none")
        if run.attack == "none":
            assert run.config.attacks == [] and run.malicious == []
        else:
            assert run.config.attacks[0].clients == chosen == run.malicious
    replacement = planned[1].config.attacks[0]
    assert (replacement.feedback, replacement.update) == ("backdoor", "model_replacement")


def test_a_distributed_backdoor_splits_its_trigger_over_its_colluders(config, tmp_path):
    three = plan(config, ["backdoor_dba"], [0.5], ["mean"], tmp_path)[1].config.attacks[0]  # 3 of 5 clients
    assert len(three.clients) == 3 and three.trigger_parts == 3 and three.feedback == "backdoor"
    alone = plan(config, ["backdoor_dba"], [0.2], ["mean"], tmp_path)[1].config.attacks[0]
    assert alone.trigger_parts == 1  # one colluder: the whole trigger


def test_malicious_clients_are_a_share_of_all_rounded_up(config):
    assert [len(malicious_clients(config, share)) for share in (0, 0.1, 0.2, 0.3, 0.5)] == [0, 1, 1, 2, 3]
    assert set(malicious_clients(config, 0.2)) <= set(malicious_clients(config, 0.5))


def row(round_index, clients, **extra):
    return {"round": round_index, "clients": [{"client": c} for c in clients], **extra}


def test_detection_counts_client_rounds_and_the_first_flag_of_each_attacker():
    screening = lambda flagged: [{"client": c, "category": "malicious" if c in flagged else "trusted"} for c in range(5)]  # noqa: E731
    history = [
        {"round": 0, "clients": []},
        row(1, range(5), screening=screening({1})),
        row(2, range(5), screening=screening({1, 3, 4})),  # 4 malicious, 3 an honest client flagged
        row(3, range(5), screening=screening({4})),
    ]
    figures = detection(history, {1, 4}, "mean")
    assert figures["true_positive_rate"] == pytest.approx(4 / 6)  # 1 in rounds 1 and 2, 4 in rounds 2 and 3
    assert figures["false_positive_rate"] == pytest.approx(1 / 9)
    assert figures["rounds_until_detection"] == pytest.approx((1 + 2) / 2)


def test_detection_counts_only_the_clients_a_screening_judged():
    history = [row(1, range(4), screening=[{"client": c, "category": "trusted"} for c in (0, 1, 2)])]  # 3 sent weight 0
    assert detection(history, {1}, "mean")["false_positive_rate"] == 0.0
    history[0]["screening"][0]["category"] = "suspicious"
    assert detection(history, {1}, "mean")["false_positive_rate"] == pytest.approx(1 / 2)  # of 0 and 2, not of 0, 2, 3


def test_detection_reads_multi_krum_and_norm_clipping_and_says_nothing_for_the_mean():
    krum = [row(1, [3, 5, 7], aggregation={"selected": [0, 2]})]
    assert detection(krum, {5}, "multi_krum")["true_positive_rate"] == 1.0
    clip = [row(1, [3, 5, 7], aggregation={"clipped": [0]})]
    assert detection(clip, {5}, "norm_clip") == {"true_positive_rate": 0.0, "false_positive_rate": 0.5, "rounds_until_detection": None}
    assert detection([row(1, [3, 5, 7])], {5}, "mean")["true_positive_rate"] is None


def test_drops_and_trigger_rates_are_against_the_attack_free_run_without_defense():
    rows = with_references([
        {"attack": "none", "defense": "mean", "loglik_accuracy": 0.5, "accuracy": 0.4, "trigger_rate": 0.1},
        {"attack": "none", "defense": "two_stage", "loglik_accuracy": 0.48, "accuracy": 0.41, "trigger_rate": 0.1},
        {"attack": "backdoor", "defense": "two_stage", "loglik_accuracy": 0.45, "accuracy": 0.3, "trigger_rate": 0.4},
    ])
    assert [r["reference"] for r in rows] == ["none-0pct-mean"] * 3
    assert rows[1]["loglik_drop"] == pytest.approx(0.02) and rows[1]["accuracy_drop"] == pytest.approx(-0.01)
    assert rows[2]["accuracy_drop"] == pytest.approx(0.1) and rows[2]["trigger_rate_above_clean"] == pytest.approx(0.3)


def test_the_probe_is_the_eval_trigger_else_the_backdoor_attacks_else_none(config):
    assert backdoor_probe(config) is None
    attacked = config.model_copy(update={"attacks": [AttackConfig(clients=[1], feedback="backdoor", trigger="cf", target_option=1)]})
    assert backdoor_probe(attacked) == ("cf", 1)
    probed = attacked.model_copy(update={"eval": EvalConfig(trigger="tq", trigger_target=0)})
    assert backdoor_probe(probed) == ("tq", 0)


def test_the_trigger_probe_asks_the_questions_of_other_answers_with_the_trigger_and_the_target_as_gold(monkeypatch):
    asked = {}

    def fake_evaluate(model, prompt_format, examples, settings, progress=False):
        asked["examples"], asked["methods"] = examples, settings.methods
        return {"loglik_accuracy": 0.25, "accuracy": 0.5}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    examples = [
        multiple_choice("a", "Sky?", ("blue", "red", "green"), 0),
        multiple_choice("b", "Grass?", ("blue", "red", "green"), 2),
        multiple_choice("c", "Fire?", ("red", "blue"), 0),  # two options: target 2 is its last, option 1
    ]
    metrics = evaluation.trigger_metrics(None, None, examples, "cf.", 2, EvalConfig(methods=["loglik", "cloze", "generate"]))
    assert metrics == {"trigger_examples": 2, "trigger_loglik_rate": 0.25, "trigger_rate": 0.5}
    assert [(e.uid, e.question, e.gold) for e in asked["examples"]] == [("a+trigger", "Sky? cf.", 2), ("c+trigger", "Fire? cf.", 1)]
    assert asked["methods"] == ["loglik", "generate"]


@pytest.mark.slow
def test_a_small_federation_under_attack_runs_through_the_bench_and_resumes(config, tmp_path):
    # a free-rider: caught by rule whatever the tiny model's honest updates look like (they share no direction
    # after two rounds on 40 questions, so a sign flip of one of them looks like any other)
    settings = ["free_rider"], [0.2], ["mean", "two_stage"], tmp_path / "bench"
    with single_thread():
        rows = attack_runs(config, *settings, show_progress=False)
    by_name = {(r["attack"], r["defense"]): r for r in rows}
    assert list(by_name) == [("none", "mean"), ("free_rider", "mean"), ("none", "two_stage"), ("free_rider", "two_stage")]
    assert by_name[("free_rider", "two_stage")]["true_positive_rate"] == 1.0
    assert by_name[("free_rider", "two_stage")]["rounds_until_detection"] == 1.0
    assert by_name[("free_rider", "mean")]["true_positive_rate"] is None  # the mean flags nobody
    for figures in rows:
        assert 0 <= figures["trigger_loglik_rate"] <= 1 and figures["server_seconds_per_round"] > 0
    assert rows[0]["loglik_drop"] == 0.0
    with single_thread():
        again = attack_runs(config, *settings, show_progress=False)  # complete folders are read back
    assert [{k: v for k, v in r.items() if k != "server_seconds_per_round"} for r in again] == [
        {k: v for k, v in r.items() if k != "server_seconds_per_round"} for r in rows
    ]
