"""spearfl bench on the tiny primed model: every section is measured and the figures are consistent."""

import json

import pytest
from helpers import end_to_end_assets, run_config_text, single_thread

from spearfl.config import load_config
from spearfl.runtime.setup import build_context, prepare_data
from spearfl.tools.bench import (
    BenchSettings,
    count_model_flops,
    measure_rounds,
    profile_rounds,
    report_tables,
    run_bench,
    targets,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    path = root / "bench.yaml"
    path.write_text(run_config_text(end_to_end_assets(), root / "unused"))
    config = load_config(path, ["lora.layers=[1]"])
    with single_thread():
        context = build_context(config)
        settings = BenchSettings(repeats=2, round_repeats=2, decode_batch_sizes=(1, 4), decode_steps=3, prefill_prompts=4, matmul_size=128, bfloat16_matmul_size=64)
        federation = prepare_data(config.model_copy(update={"personal": config.personal.model_copy(update={"method": "tap"})}))
        return run_bench(context, federation.clients[0], settings, baseline_resident_mb=100.0, validation=federation.client_validation[0]), context


def test_the_report_has_every_section_and_is_json(report):
    report, _ = report
    json.dumps(report)
    assert {"machine", "model", "rounds", "memory", "upload", "targets"} <= report.keys()
    assert [row["batch_size"] for row in report["model"]["decode"]] == [1, 4]
    for row in [report["model"]["prefill"], report["model"]["training"], *report["model"]["decode"]]:
        figure = row["tokens_per_s"]
        assert figure["low"] <= figure["median"] <= figure["high"] and figure["repeats"] == 2
    assert len(report["rounds"]["runs"]["spear"]) == len(report["rounds"]["runs"]["grpo"]) == 2
    assert len(report_tables(report)) == 4
    # the device with two adapters: TAP rounds measured on the same repeats, stage 2 once, on a validation split
    personal = report["personal"]
    assert len(personal["runs"]) == 2 and personal["validation_examples"] > 0
    assert personal["after_federation"]["peak_memory_mb"] > 0 and report["memory"]["tap_peak_mb"] > 0


def test_ratios_pair_the_rounds_of_one_run(report):
    report, _ = report
    spear, grpo = report["rounds"]["runs"]["spear"], report["rounds"]["runs"]["grpo"]
    ratios = sorted(s["seconds"] / g["seconds"] for s, g in zip(spear, grpo))
    assert report["rounds"]["spear_over_grpo"]["seconds"]["low"] == ratios[0]
    assert report["rounds"]["spear_over_grpo"]["seconds"]["high"] == ratios[-1]
    assert all(g["generations"] == 4 * s_prompts for g, s_prompts in zip(grpo, [6, 6]))  # G = 4 on SPEAR's 6 prompts


def test_counted_flops_follow_the_lora_layers(report):
    report, context = report
    flops = count_model_flops(context.model)
    assert 0 < flops.decoder_linear_from_lowest_lora < flops.decoder_linear  # LoRA on layer 1 of 2: half the backward
    assert flops.training(10, 2) > flops.forward(10, 2)
    assert report["upload"]["bfloat16_over_float32"] == 0.5


def test_targets_say_whether_each_holds():
    fake = {
        "model": {"training": {"mfu": 0.5}, "prefill": {"mfu": 0.4}, "decode": [
            {"batch_size": 1, "tokens_per_s": {"median": 10.0}}, {"batch_size": 32, "tokens_per_s": {"median": 80.0}}]},
        "rounds": {"spear_over_grpo": {"seconds": {"median": 0.3}}},
        "upload": {"bfloat16_over_float32": 0.5},
        "memory": {"spear_peak_over_reference": 2.5, "spear_peak_mb": 1500.0, "tap_peak_over_reference": 1.4, "tap_peak_mb": 2100.0,
                   "tap_after_federation_over_reference": 1.6, "tap_after_federation_peak_mb": 1900.0},
    }
    met = [target["met"] for target in targets(fake)]
    assert met == [True, False, True, True, True, False, True, True, False, False, True]


def test_presets_name_the_repository_configs_and_an_unknown_one_is_refused():
    from spearfl.config import load_config
    from spearfl.errors import UserError
    from spearfl.tools.bench import preset_config

    paper = load_config(preset_config("paper"), [])
    assert (paper.lora.rank, paper.lora.alpha, paper.lora.dropout, paper.lora.layers) == (16, 32.0, 0.1, None)
    assert len(paper.lora.target_modules) == 7 and paper.client.prompts_per_round == 32 and paper.spear.batch_size == 8
    assert load_config(preset_config("demo"), []).server.rounds == 8
    with pytest.raises(UserError, match="unknown preset 'phone': choose one of demo, paper"):
        preset_config("phone")


def test_the_rounds_report_each_phase_peak_and_the_plan(report):
    report, _ = report
    for run in report["rounds"]["runs"]["spear"]:
        assert 0 < run["generation_peak_memory_mb"] and run["peak_memory_mb"] == max(run["generation_peak_memory_mb"], run["training_peak_memory_mb"])
        if run["weight"]:
            assert run["training_peak_memory_mb"] > 0 and run["micro_batch_rows"] >= 1


def test_the_profile_names_the_operators_of_both_rounds(report):
    _, context = report
    with single_thread():
        profiles = profile_rounds(context, prepare_data(context.config).clients[0], top=5)
    assert profiles.keys() == {"spear", "grpo"}
    for entry in profiles.values():
        operators = entry["top_operators"]
        assert 0 < len(operators) <= 5 and "Self CPU" in entry["table"]
        assert all(a["self_seconds"] >= b["self_seconds"] for a, b in zip(operators, operators[1:]))
        assert 0 < sum(op["self_share"] for op in operators) <= 1.05  # own times of distinct operators within the round


def test_a_ratio_with_nothing_to_divide_by_is_left_out(report, monkeypatch):
    _, context = report

    def fake_round(algorithm_context, algorithm, work):
        trained = 0.0 if algorithm == "grpo" else 1.5  # GRPO's groups all scored alike: nothing to train
        return {"seconds": 2.0 + trained, "generation_seconds": 2.0, "training_seconds": trained, "generated_tokens": 10}

    monkeypatch.setattr("spearfl.tools.bench.measure_round", fake_round)
    rounds = measure_rounds(context, prepare_data(context.config).clients[0], repeats=2)
    assert "training_seconds" not in rounds["spear_over_grpo"]
    assert rounds["spear_over_grpo"]["seconds"]["median"] == 3.5 / 2.0


def test_a_shared_beginning_counts_once_in_the_flop_fractions(report):
    _, context = report
    from spearfl.tools.bench import measure_prefill

    flops = count_model_flops(context.model)
    beginning = list(range(5, 15))  # 10 tokens every prompt starts with: prefill runs them once
    shared = [beginning + [20 + i, 30 + i] for i in range(3)]
    distinct = [[40 + i] + beginning + [20 + i, 30 + i] for i in range(3)]  # same lengths, nothing shared
    with single_thread():
        together, apart = (measure_prefill(context, prompts, flops, ceiling=1e9, repeats=1) for prompts in (shared, distinct))
    assert together["tokens"] == 36 and together["tokens_run"] == 36 - 2 * 10
    assert apart["tokens"] == apart["tokens_run"] == 39
    per_token_counted = together["counted_fraction"] / together["tokens_per_s"]["median"]
    assert per_token_counted == pytest.approx(flops.forward(16, 3) / 36 / 1e9)
    assert together["mfu"] / together["tokens_per_s"]["median"] == pytest.approx(2 * flops.all_parameters * 16 / 36 / 1e9)
