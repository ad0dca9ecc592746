"""The local simulation end to end on a primed tiny model: run folder, resume after an interruption, failures."""

import json
import os
import signal

import pytest
import torch
from helpers import (
    end_to_end_assets,
    read_history,
    reference_run,
    single_thread,
    strip_timing,
    write_run_config,
)
from safetensors.torch import load_file

import spearfl.runtime.local as local
import spearfl.runtime.server as server
from spearfl.algorithms import ALGORITHMS
from spearfl.config import ConfigError, config_to_dict, load_config
from spearfl.io import load_tensors
from spearfl.lm.models import frozen_lora_state, set_adapter_state
from spearfl.runtime.evaluation import evaluate
from spearfl.runtime.local import run_local
from spearfl.runtime.run_folder import RunFolder
from spearfl.runtime.server import RunConflict, choose_clients
from spearfl.runtime.setup import build_context, prepare_data

REAL_UPDATE = ALGORITHMS["spear"]


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def config_for(name: str, *overrides: str):
    assets = end_to_end_assets()
    path = write_run_config(assets, assets.root / f"{name}.yaml", assets.root / name)
    return load_config(path, list(overrides))


def read_json(path):
    return json.loads(path.read_text())


def test_reference_run_folder_is_complete_and_trained():
    folder = reference_run()
    config = config_for("reference-run")
    assert RunFolder(folder).read_config() == config_to_dict(config)
    history = read_history(folder)
    assert [row["round"] for row in history] == [0, 1, 2]
    assert all("eval" in row for row in history)
    assert history[0]["clients"] == [] and "online" not in history[0]
    for row in history[1:]:
        assert [client["client"] for client in row["clients"]] == choose_clients(config, row["round"])
        assert row["lr"] > 0
        assert row["online"]["wins"] == sum(client["metrics"]["wins"] for client in row["clients"])
    weights = [client["weight"] for row in history[1:] for client in row["clients"]]
    assert any(weight > 0 for weight in weights)
    for client in (client for row in history[1:] for client in row["clients"]):  # the prompts trained on
        wins, losses = client["metrics"]["wins"], client["metrics"]["losses"]
        assert client["weight"] == 0 if wins == 0 else wins <= client["weight"] <= wins + losses
    assert read_json(folder / "status.json")["state"] == "complete"
    summary = read_json(folder / "summary.json")
    assert summary["before"] == history[0]["eval"] and summary["after"] == history[2]["eval"]
    assert summary["rounds"] == 2 and summary["trained_tokens"] > 0
    first, last = load_file(folder / "adapters" / "round_0000.safetensors"), load_file(folder / "adapters" / "round_0002.safetensors")
    assert first.keys() == last.keys()
    assert all(torch.count_nonzero(value) == 0 for name, value in first.items() if "lora_B" in name)  # peft starts B at 0
    assert any(not torch.equal(first[name], last[name]) for name in first)


def test_history_rows_log_the_lora_averaging_gap():
    history = read_history(reference_run())
    assert "lora_average_error" not in history[0]  # round 0 aggregates nothing
    for row in history[1:]:
        assert sum(client["weight"] > 0 for client in row["clients"]) == 2
        assert 0 < row["lora_average_error"] < 1  # each client trains its own A: mean(B) mean(A) != mean(B A)


def test_data_preparation_and_client_choice_are_deterministic():
    config = config_for("reference-run")
    first, second = prepare_data(config), prepare_data(config)
    assert [e.uid for e in first.heldout] == [e.uid for e in second.heldout]
    assert [[e.uid for e in pool] for pool in first.clients] == [[e.uid for e in pool] for pool in second.clients]
    held_out = {e.uid for e in first.heldout}
    assert len(held_out) == 8 and not held_out & {e.uid for pool in first.clients for e in pool}
    assert choose_clients(config, 1) == choose_clients(config, 1)
    assert len(set(choose_clients(config, 1))) == 2


def test_a_complete_folder_is_not_run_again(monkeypatch):
    folder = reference_run()
    history_before = (folder / "history.jsonl").read_text()
    monkeypatch.setattr(server, "build_context", lambda *args, **kwargs: pytest.fail("loaded a model for a finished run"))
    summary = run_local(config_for("reference-run"), show_progress=False)
    assert summary == read_json(folder / "summary.json")
    assert (folder / "history.jsonl").read_text() == history_before


def test_a_different_config_in_the_same_folder_is_refused(monkeypatch):
    folder = reference_run()
    monkeypatch.setattr(server, "build_context", lambda *args, **kwargs: pytest.fail("loaded a model for a conflicting run"))
    with pytest.raises(RunConflict) as caught:
        run_local(config_for("reference-run", "seed=8", "spear.margin=0.5"), show_progress=False)
    assert "seed" in str(caught.value) and "spear.margin" in str(caught.value)
    assert RunFolder(folder).read_config()["seed"] == 7


def test_fresh_deletes_the_old_folder_first(tmp_path, monkeypatch):
    config = config_for("unused", f"output_dir={tmp_path / 'old'}")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("seed: 123\n")
    monkeypatch.setattr(server.FederatedRun, "run", lambda self: {"ran": True})
    assert run_local(config, fresh=True, show_progress=False) == {"ran": True}
    assert not (tmp_path / "old").exists()


def interrupt_in_round(round_index: int, exception: BaseException):
    def update(context, work):
        if work.round_index == round_index:
            raise exception
        return REAL_UPDATE(context, work)

    return update


@pytest.fixture(scope="module")
def interrupted_run():
    """A run stopped by Ctrl-C during round 2; returns (folder, status, summary present, history) at that moment."""
    config = config_for("interrupted-run")
    with single_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setitem(ALGORITHMS, "spear", interrupt_in_round(2, KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            run_local(config, show_progress=False)
    folder = RunFolder(config.output_dir)
    return folder, folder.read_status(), folder.summary_path.exists(), folder.read_history(), config


def test_interruption_leaves_an_incomplete_folder_that_says_so(interrupted_run):
    folder, status, has_summary, history, _ = interrupted_run
    assert status["state"] == "interrupted"
    assert not has_summary
    assert [row["round"] for row in history] == [0, 1]
    assert folder.load_checkpoint().round_index == 1
    assert status["last_round"] == 1  # rounds 0 and 1 finished and are checkpointed


def test_resumed_run_repeats_the_uninterrupted_history(interrupted_run):
    folder, _, _, _, config = interrupted_run
    summary = run_local(config, show_progress=False)
    assert folder.read_status()["state"] == "complete"
    reference = reference_run()
    assert strip_timing(folder.read_history()) == strip_timing(read_history(reference))
    assert strip_timing(summary) == strip_timing(read_json(reference / "summary.json"))
    for round_index in (0, 1, 2):
        resumed = load_tensors(folder.adapter_path(round_index))
        uninterrupted = load_file(reference / "adapters" / f"round_{round_index:04d}.safetensors")
        assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)


def test_a_failing_client_marks_the_run_failed_at_its_last_checkpoint(monkeypatch):
    config = config_for("failed-run")
    monkeypatch.setitem(ALGORITHMS, "spear", interrupt_in_round(1, RuntimeError("client crashed")))
    with pytest.raises(RuntimeError, match="client crashed"):
        run_local(config, show_progress=False)
    folder = RunFolder(config.output_dir)
    status = folder.read_status()
    assert status["state"] == "failed" and status["last_round"] == 0 and "client crashed" in status["message"]
    assert [row["round"] for row in folder.read_history()] == [0]
    assert not folder.summary_path.exists()


def test_sigterm_marks_the_run_interrupted():
    config = config_for("terminated-run")

    def terminate_in_round_1(context, work):
        if signal.getsignal(signal.SIGTERM) is not local.stop_on_terminate:
            pytest.fail("run_local did not install its SIGTERM handler")  # never send an unhandled SIGTERM to pytest
        os.kill(os.getpid(), signal.SIGTERM)
        return REAL_UPDATE(context, work)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(ALGORITHMS, "spear", terminate_in_round_1)
            with pytest.raises(KeyboardInterrupt):
                run_local(config, show_progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    status = RunFolder(config.output_dir).read_status()
    assert status["state"] == "interrupted" and status["last_round"] == 0


def test_run_local_restores_the_callers_sigterm_handler():
    """run_local is also a library call: it must not leave its handler behind in the caller's process."""
    previous = signal.getsignal(signal.SIGTERM)

    def callers_handler(signal_number, frame):
        pass

    signal.signal(signal.SIGTERM, callers_handler)
    try:
        run_local(config_for("reference-run"), show_progress=False)  # a complete folder: returns at once
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_bfloat16_base_model_trains_its_adapter(tmp_path, monkeypatch):
    from helpers import one_round

    config, _, _, row = one_round(tmp_path, monkeypatch, "spear", "model.dtype=bfloat16")
    assert config.model.dtype == "bfloat16"
    assert any(client["weight"] > 0 for client in row["clients"])  # one_round also checks the adapter moved


def folder_holding(path, saved: dict) -> RunFolder:
    """A run folder whose config.yaml holds `saved`, as an older version would have written it."""
    folder = RunFolder(path)
    folder.path.mkdir(exist_ok=True)
    folder.write_config(saved)
    return folder


def test_a_folder_written_before_a_config_field_existed_holds_its_default(tmp_path):
    config = config_for("unused", f"output_dir={tmp_path / 'old'}")
    saved = config_to_dict(config)
    del saved["server"]["upload_encoding"]  # a field added later, at its default
    server.check_run_folder(folder_holding(tmp_path / "old", saved), config)
    saved["server"]["upload_encoding"] = "bfloat16"
    with pytest.raises(RunConflict, match="server.upload_encoding"):
        server.check_run_folder(folder_holding(tmp_path / "old", saved), config)


def test_a_folder_written_with_a_retired_config_field_resumes(tmp_path):
    config = config_for("unused", f"output_dir={tmp_path / 'old'}")
    saved = config_to_dict(config)
    saved["feedback"]["provider"] = "oracle"  # written by a version that had the (unread) field
    server.check_run_folder(folder_holding(tmp_path / "old", saved), config)
    saved["feedback"]["hint"] = "facts"
    with pytest.raises(RunConflict, match="feedback.hint"):
        server.check_run_folder(folder_holding(tmp_path / "old", saved), config)


def test_another_personalization_methods_settings_do_not_make_another_run(tmp_path):
    """A run folder matches a config that differs from it only in a setting its method never reads (TAP's, for a
    `none` or `local` run), and not one that differs in a setting its method reads."""
    tap = config_for("unused", f"output_dir={tmp_path / 'old'}", "personal.method=tap")
    saved = config_to_dict(tap)
    saved["personal"]["tap"]["final_check"] = True
    with pytest.raises(RunConflict, match="personal.tap.final_check"):
        server.check_run_folder(folder_holding(tmp_path / "old", saved), tap)
    for method in ("none", "local"):
        other = config_for("unused", f"output_dir={tmp_path / 'old'}", f"personal.method={method}")
        saved = config_to_dict(other)
        saved["personal"]["tap"]["final_check"] = True
        server.check_run_folder(folder_holding(tmp_path / "old", saved), other)
        saved["personal"]["validation_fraction"] = 0.5  # a setting every method reads still counts
        with pytest.raises(RunConflict, match="personal.validation_fraction"):
            server.check_run_folder(folder_holding(tmp_path / "old", saved), other)


@pytest.fixture(scope="module")
def ffa_run():
    """An FFA-LoRA run of the reference config; returns (config, its context, the LoRA A before the run)."""
    config = config_for("ffa-run", "lora.ffa=true")
    with single_thread():
        context = build_context(config)
        shared_before = frozen_lora_state(context.model)
        run_local(config, show_progress=False, context=context)
    return config, context, shared_before


def test_an_ffa_run_sends_b_only_keeps_a_and_averages_exactly(ffa_run):
    config, context, shared_before = ffa_run
    folder, reference = RunFolder(config.output_dir), reference_run()
    adapters = [load_tensors(folder.adapter_path(index)) for index in (0, 1, 2)]
    reference_first = load_file(reference / "adapters" / "round_0000.safetensors")
    assert all(adapter.keys() == {name for name in reference_first if "lora_B" in name} for adapter in adapters)
    assert any(not torch.equal(adapters[0][name], adapters[2][name]) for name in adapters[0])  # B trained
    shared_after = frozen_lora_state(context.model)
    assert shared_after.keys() == {name for name in reference_first if "lora_A" in name}
    assert all(torch.equal(shared_after[name], shared_before[name]) for name in shared_before)  # A never trained
    assert all(torch.equal(shared_after[name], reference_first[name]) for name in shared_after)  # the run seed's A
    b_bytes = 4 * sum(tensor.numel() for tensor in adapters[0].values())
    full_bytes = {client["metrics"]["upload_bytes"] for row in read_history(reference)[1:] for client in row["clients"]}
    assert full_bytes == {2 * b_bytes}  # the tiny model has as many A weights as B weights
    history = folder.read_history()
    for row in history[1:]:
        assert {client["metrics"]["upload_bytes"] for client in row["clients"] if client["weight"] > 0} == {b_bytes}
    assert [row["lora_average_error"] for row in history[1:]] == [0.0, 0.0]  # two clients trained in each round


def test_a_saved_ffa_adapter_evaluates_as_in_its_run(ffa_run):
    """What `spearfl eval --adapter` does: a model built anew from the run's config gets the run's A."""
    config, _, _ = ffa_run
    folder = RunFolder(config.output_dir)
    context = build_context(config)
    set_adapter_state(context.model, load_tensors(folder.adapter_path(2)))
    metrics = evaluate(context.model, context.prompts, prepare_data(config).heldout, config.eval, progress=False)
    assert server.clean(metrics) == folder.read_history()[2]["eval"]


def test_a_resumed_ffa_run_repeats_the_uninterrupted_one(ffa_run):
    config, _, _ = ffa_run
    resumed = config_for("ffa-resumed-run", "lora.ffa=true")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ALGORITHMS, "spear", interrupt_in_round(2, KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            run_local(resumed, show_progress=False)
    run_local(resumed, show_progress=False)
    folder, uninterrupted = RunFolder(resumed.output_dir), RunFolder(config.output_dir)
    assert strip_timing(folder.read_history()) == strip_timing(uninterrupted.read_history())
    final, expected = load_tensors(folder.adapter_path(2)), load_tensors(uninterrupted.adapter_path(2))
    assert final.keys() == expected.keys() and all(torch.equal(final[name], expected[name]) for name in expected)


def test_each_client_is_scored_on_its_own_held_out_examples(tmp_path):
    """With data.client_heldout_fraction, each client's own held-out examples leave its training pool, and every
    evaluation scores the global adapter on each client's: the history, the summary (mean, worst) and the plot."""
    config = config_for("per-client", f"output_dir={tmp_path / 'run'}", "data.client_heldout_fraction=0.25",
                        "server.rounds=1", "eval.methods=[loglik]")
    federation = prepare_data(config)
    plain = prepare_data(config_for("reference-run"))
    splits = zip(federation.clients, federation.client_heldout, federation.client_validation, plain.clients)
    for pool, own, validation, whole in splits:  # held out, then the validation split cut from what is left
        assert own and validation and not {e.uid for e in own} & ({e.uid for e in pool} | {e.uid for e in validation})
        assert not {e.uid for e in validation} & {e.uid for e in pool}
        assert {e.uid for e in own} | {e.uid for e in pool} | {e.uid for e in validation} == {e.uid for e in whole}
        assert len(own) == max(1, round(0.25 * len(whole)))
    summary = run_local(config, show_progress=False)
    history = read_history(tmp_path / "run")
    context = build_context(config)
    for row in history:
        assert [entry["client"] for entry in row["client_eval"]] == [0, 1, 2]
    for adapter_round, row in ((0, history[0]), (1, history[-1])):
        set_adapter_state(context.model, load_tensors(tmp_path / "run" / "adapters" / f"round_{adapter_round:04d}.safetensors"))
        for entry, own in zip(row["client_eval"], federation.client_heldout):
            assert entry["global"] == evaluate(context.model, context.prompts, own, config.eval)
    last = {entry["client"]: entry["global"]["loglik_accuracy"] for entry in history[-1]["client_eval"]}
    figures = summary["clients"]["global"]["loglik_accuracy"]
    assert figures["mean"] == pytest.approx(sum(last.values()) / 3, abs=1e-12)
    assert figures["worst"] == min(last.values()) and last[figures["worst_client"]] == figures["worst"]
    assert (tmp_path / "run" / "clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_client_too_small_to_hold_any_out_is_a_config_error(tmp_path):
    config = config_for("too-small", f"output_dir={tmp_path / 'run'}", "data.client_heldout_fraction=0.99")
    with pytest.raises(ConfigError, match=r"client \d+ has \d+ examples: too few"):
        prepare_data(config)
