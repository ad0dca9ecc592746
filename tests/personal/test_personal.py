"""Personalization (spearfl.personal): the distillation term, TAP's replacement rule, what leaves the device, the
proximal pull, and the personal adapters through an interrupted and resumed run."""

import math

import pytest
import torch
from helpers import end_to_end_assets, single_thread, strip_timing, write_run_config

from spearfl.algorithms import ALGORITHMS
from spearfl.config import PersonalConfig, TapConfig, load_config
from spearfl.lm.models import get_adapter_state, lora_parameters, set_adapter_state
from spearfl.losses.distill import tempered_distillation_loss
from spearfl.personal import METHODS, PersonalClient
from spearfl.lm.generation import Completion
from spearfl.personal import tap as tap_module
from spearfl.personal.base import JudgedAnswer, correct_answer, module_groups, validation_loss
from spearfl.personal.ditto import ProximalPull
from spearfl.personal.tap import gate, replace_modules, validation_accuracy
from spearfl.runtime.evaluation import completion_metrics
from spearfl.runtime.local import run_local
from spearfl.runtime.run_folder import RunFolder
from spearfl.runtime.setup import build_context, prepare_data

REAL_UPDATE = ALGORITHMS["spear"]


def config_for(name: str, *overrides: str):
    assets = end_to_end_assets()
    path = write_run_config(assets, assets.root / f"{name}.yaml", assets.root / name)
    return load_config(path, ["data.client_heldout_fraction=0.25", "eval.methods=[loglik]", "personal.after_steps=2", *overrides])


def test_the_distillation_term_is_the_hand_computed_kl_on_three_tokens():
    """T^2 KL(softmax(t/T) || softmax(s/T)) summed over the masked tokens, over the sequences: by hand, in float64."""
    teacher_logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]]], dtype=torch.float64)
    student_logits = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -1.0, 2.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    temperature = 2.0
    expected = 0.0
    for position in range(2):  # the third token is masked out
        t = [math.exp(v / temperature) for v in teacher_logits[0, position].tolist()]
        s = [math.exp(v / temperature) for v in student_logits[0, position].tolist()]
        p = [v / sum(t) for v in t]
        q = [v / sum(s) for v in s]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected *= temperature**2
    teacher_logprobs = torch.log_softmax(teacher_logits, dim=-1)  # what a teacher pass keeps: log-probs at T = 1
    got = tempered_distillation_loss(teacher_logprobs, student_logits, mask, temperature, num_sequences=1)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    two = tempered_distillation_loss(teacher_logprobs.repeat(2, 1, 1), student_logits.repeat(2, 1, 1), mask.repeat(2, 1), temperature, 2)
    assert float(two) == pytest.approx(expected, rel=1e-12)  # averaged over sequences, summed over their tokens


def test_module_groups_by_layer_projection_and_adapter():
    names = [f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{part}.weight"
             for layer in (1, 0, 10) for proj in ("q_proj", "v_proj") for part in "AB"]
    layers = module_groups(names, "layer")
    assert list(layers) == ["layer 0", "layer 1", "layer 10"] and all(len(group) == 4 for group in layers.values())
    assert len(module_groups(names, "projection")) == 6
    assert module_groups(names, "adapter") == {"adapter": sorted(names, key=lambda n: (int(n.split(".")[4]), n))}


@pytest.fixture(scope="module")
def tiny():
    config = config_for("tap-unit")
    with single_thread():
        context = build_context(config)
    federation = prepare_data(config)
    return context, federation


def with_first_layer_spoilt(good):
    """(the adapter's layer groups, its first layer, the adapter with that layer's tensors moved by 3 x noise)."""
    generator = torch.Generator().manual_seed(0)
    groups = module_groups(good, "layer")
    first = list(groups)[0]
    spoilt = {name: (tensor + 3.0 * torch.randn(tensor.shape, generator=generator) if name in groups[first] else tensor.clone())
              for name, tensor in good.items()}
    return groups, first, spoilt


def test_replacement_happens_if_and_only_if_the_validation_loss_falls_by_the_margin(tiny):
    """A teacher that is the personal adapter with one layer spoilt is never taken; a personal adapter with one layer
    spoilt takes the teacher's layer back, and only that one."""
    context, federation = tiny
    validation = federation.client_validation[0]
    good = get_adapter_state(context.model)
    groups, first, spoilt = with_first_layer_spoilt(good)
    set_adapter_state(context.model, good)
    good_loss = validation_loss(context, validation)
    set_adapter_state(context.model, spoilt)
    assert validation_loss(context, validation) > good_loss + 0.01  # the crafted case spoils the validation loss

    kept, replaced = replace_modules(context, good, spoilt, validation, margin=0.01, unit="layer")
    assert replaced == [] and all(torch.equal(kept[name], good[name]) for name in good)

    repaired, replaced = replace_modules(context, spoilt, good, validation, margin=0.01, unit="layer")
    assert replaced == [first] and all(torch.equal(repaired[name], good[name]) for name in good)

    _, replaced = replace_modules(context, spoilt, good, validation, margin=1e6, unit="layer")
    assert replaced == []  # an improvement smaller than the margin replaces nothing
    set_adapter_state(context.model, good)  # as the test found the module's model


def test_validation_accuracy_counts_greedy_answers_as_the_held_out_evaluation_does(tiny, monkeypatch):
    """Replies that give the gold answer for the first half of the validation split and another option for the rest:
    the gate's accuracy is the half right, and the held-out evaluation's count of the same replies agrees."""
    context, federation = tiny
    validation = [example for example in federation.client_validation[0] if example.is_multiple_choice]
    tokenizer, prompts = context.prompts.tokenizer, context.prompts
    half = len(validation) // 2
    assert half >= 1

    def reply(example, index):
        label = example.gold_label if index < half else next(label for label in example.labels if label != example.gold_label)
        ids = prompts.option_completion(label)
        return Completion(ids, tokenizer.decode(ids, skip_special_tokens=True), "stop", [0.0] * len(ids))

    replies = [reply(example, index) for index, example in enumerate(validation)]
    monkeypatch.setattr(tap_module, "generate", lambda model, tokenizer, prompts, **_: replies[: len(prompts)])
    got = validation_accuracy(context, validation)
    assert got == half / len(validation)
    assert got == completion_metrics(prompts, validation, replies)["accuracy"]


@pytest.mark.parametrize(("personal_score", "global_score", "kept"), [(0.5, 0.4, "personal"), (0.4, 0.4, "global"), (0.3, 0.4, "global")])
def test_the_final_gate_keeps_the_personal_adapter_only_where_it_answers_more_right(tiny, monkeypatch, personal_score, global_score, kept):
    """Scored in greedy accuracy on the validation split (which adapter is in the model decides the score here):
    strictly better keeps the personal adapter, a tie or worse gives the client the global one."""
    context, federation = tiny
    good = get_adapter_state(context.model)
    _, _, personal = with_first_layer_spoilt(good)
    name = next(iter(personal))

    def score(context, examples):
        in_model = lora_parameters(context.model)[name].detach().cpu()
        return personal_score if torch.equal(in_model, personal[name]) else global_score

    monkeypatch.setattr(tap_module, "validation_accuracy", score)
    state, notes = gate(context, personal, good, federation.client_validation[0], margin=0.01)
    assert notes == {"measure": "accuracy", "personal": personal_score, "global": global_score, "kept": kept}
    wanted = personal if kept == "personal" else good
    assert all(torch.equal(state[key], wanted[key]) for key in wanted)
    set_adapter_state(context.model, good)


def test_on_a_device_the_final_gate_compares_the_loss_of_the_judged_answers(tiny):
    """A device's validation split has no gold labels: answers judged right, scored by their loss. A personal adapter
    with a layer spoilt loses to the global one; the global adapter spoilt instead, the personal one is kept."""
    context, federation = tiny
    judged = [JudgedAnswer(*correct_answer(context, example), True) for example in federation.client_validation[0]]
    good = get_adapter_state(context.model)
    _, _, spoilt = with_first_layer_spoilt(good)
    state, notes = gate(context, spoilt, good, judged, margin=0.01)
    assert notes["measure"] == "minus loss" and notes["kept"] == "global" and all(torch.equal(state[k], good[k]) for k in good)
    state, notes = gate(context, good, spoilt, judged, margin=0.01)
    assert notes["kept"] == "personal" and notes["personal"] > notes["global"] + 0.01
    assert all(torch.equal(state[k], good[k]) for k in good)
    _, notes = gate(context, good, good, judged, margin=0.01)
    assert notes["kept"] == "global"  # equal losses: not better by the margin
    set_adapter_state(context.model, good)


@pytest.mark.parametrize("final_gate", [True, False])
def test_tap_with_the_final_gate_answers_with_the_global_adapter_where_its_own_is_no_better(tiny, final_gate):
    """Stage 2 from a personal adapter with a layer spoilt: with the gate the client ends with the global adapter
    (its own answers no more of the validation split right), and the gate's scores are in the metrics; without it,
    the personal adapter that stage 2 left."""
    context, federation = tiny
    validation = federation.client_validation[0]
    good = get_adapter_state(context.model)
    _, _, spoilt = with_first_layer_spoilt(good)
    settings = context.config.personal.model_copy(update={"tap": TapConfig(final_gate=final_gate)})
    client = PersonalClient(0, federation.clients[0], validation, personal=spoilt)
    with single_thread():
        state, metrics = METHODS["tap"](settings).after_federation(context, client, good, round_index=4)
    is_global = all(torch.equal(state[name], good[name]) for name in good)
    if final_gate:
        gated = metrics["final_gate"]
        assert gated["personal"] <= gated["global"] and gated["kept"] == "global" and is_global
    else:
        assert "final_gate" not in metrics and not is_global
    set_adapter_state(context.model, good)


def test_fedper_sends_the_shared_modules_and_the_global_copies_of_its_own():
    method = METHODS["fedper"](PersonalConfig(fedper_local_layers=1))
    names = [f"m.layers.{layer}.q_proj.lora_{part}.weight" for layer in (0, 1) for part in "AB"]
    global_state = {name: torch.zeros(2, 2) for name in names}
    trained = {name: torch.full((2, 2), 1.0 + index) for index, name in enumerate(names)}
    sent = method.shared(trained, global_state)
    assert all(torch.equal(sent[name], trained[name]) for name in names if ".layers.0." in name)
    assert all(torch.equal(sent[name], global_state[name]) for name in names if ".layers.1." in name)
    client = PersonalClient(0, [], [], personal=trained)
    start = method.round_start(client, global_state)
    assert all(torch.equal(start[name], (trained if ".layers.1." in name else global_state)[name]) for name in names)


def test_the_proximal_pull_adds_lambda_times_the_distance_to_the_global_adapter(tiny):
    context, _ = tiny
    parameters = lora_parameters(context.model)
    anchor = {name: torch.zeros_like(parameter) for name, parameter in parameters.items()}
    for parameter in parameters.values():
        parameter.grad = torch.ones_like(parameter)
    ProximalPull(0.5, anchor).bind(context.model).project_gradients()
    for parameter in parameters.values():
        assert torch.allclose(parameter.grad, 1 + 0.5 * parameter.detach(), rtol=0, atol=0)
        parameter.grad = None


def interrupt_in_round(round_index: int):
    def update(context, work):
        if work.round_index == round_index:
            raise KeyboardInterrupt()
        return REAL_UPDATE(context, work)

    return update


@pytest.mark.parametrize("method", ["ditto", "tap", "fedper", "local", "finetune"])
def test_a_resumed_run_holds_the_same_personal_adapters_byte_for_byte(method):
    """Interrupted in round 2, resumed from round 1's checkpoint (its personal adapters with it): the history and
    every client's personal adapter equal the uninterrupted run's, byte for byte; only the personal methods keep
    personal adapters, and the global and personal figures are both reported per client."""
    whole = config_for(f"{method}-whole", f"personal.method={method}", "personal.fedper_local_layers=1")
    resumed = config_for(f"{method}-resumed", f"personal.method={method}", "personal.fedper_local_layers=1")
    with single_thread():
        run_local(whole, show_progress=False)
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(ALGORITHMS, "spear", interrupt_in_round(2))
            with pytest.raises(KeyboardInterrupt):
                run_local(resumed, show_progress=False)
        assert load_tensors_of(RunFolder(resumed.output_dir), 1) or method == "finetune"  # round 1's checkpoint keeps them
        run_local(resumed, show_progress=False)
    a, b = RunFolder(whole.output_dir), RunFolder(resumed.output_dir)
    assert strip_timing(a.read_history()) == strip_timing(b.read_history())
    personal_a = sorted((a.path / "personal").glob("client_*.safetensors"))
    assert personal_a and [p.name for p in personal_a] == sorted(p.name for p in (b.path / "personal").glob("client_*.safetensors"))
    for path in personal_a:
        assert path.read_bytes() == (b.path / "personal" / path.name).read_bytes()
    last = a.read_history()[-1]["client_eval"]
    assert all({"global", "personal"} <= set(row) for row in last)


def load_tensors_of(folder: RunFolder, round_index: int) -> dict:
    """The personal adapters held in the checkpoint of `round_index` (the latest one)."""
    checkpoint = folder.load_checkpoint()
    assert checkpoint.round_index == round_index
    return checkpoint.personal or {}


def test_a_checkpoint_keeps_clients_that_hold_the_very_same_tensors(tmp_path):
    from spearfl.federated.aggregation import initial_server_state
    from spearfl.runtime.run_folder import RunFolder

    shared = {"x.lora_A.weight": torch.arange(6.0).reshape(2, 3)}  # two clients left with one adapter (the global one)
    folder = RunFolder(tmp_path / "run")
    folder.save_checkpoint(3, shared, initial_server_state(), {}, personal={0: shared, 4: shared})
    restored = folder.load_checkpoint().personal
    assert sorted(restored) == [0, 4] and all(torch.equal(restored[c]["x.lora_A.weight"], shared["x.lora_A.weight"]) for c in (0, 4))


@pytest.mark.parametrize("method", ["tap", "ditto"])
def test_a_client_without_a_personal_adapter_starts_one_from_the_base_model(tiny, method):
    """TAP's and Ditto's clients start their personal models from the initial model, not from the global adapter
    of the round they are first chosen in: the personal pass starts from the global adapter's A with B zero (TAP
    with a margin no module clears, so that stage 1 keeps what it starts from); a client's own adapter starts it."""
    context, federation = tiny
    generator = torch.Generator().manual_seed(0)
    trained_global = {name: tensor + 0.1 * torch.randn(tensor.shape, generator=generator)
                      for name, tensor in get_adapter_state(context.model).items()}
    settings = PersonalConfig(method=method, tap={"margin": 1e9})
    new = PersonalClient(0, [], federation.client_validation[0])
    start = METHODS[method](settings).personal_pass(new, trained_global).start(context, trained_global)
    assert all(torch.count_nonzero(start[name]) == 0 for name in start if ".lora_B." in name)
    assert all(torch.equal(start[name], trained_global[name]) for name in start if ".lora_A." in name)
    own = PersonalClient(0, [], federation.client_validation[0], personal=trained_global)
    start = METHODS[method](settings).personal_pass(own, trained_global).start(context, trained_global)
    assert all(torch.equal(start[name], trained_global[name]) for name in start)


@pytest.mark.parametrize("final_check", [True, False])
def test_tap_ends_with_the_global_layer_where_stage_two_leaves_a_worse_one(tiny, final_check):
    """A personal adapter with one layer spoilt, then stage 2 (two steps, which cannot mend it): with the final check
    the layer is the global adapter's and the validation loss back within the margin of the global one's; without
    it (TAP's code) the spoilt layer stays, and so does the loss."""
    context, federation = tiny
    validation = federation.client_validation[0]
    good = get_adapter_state(context.model)
    groups, first, spoilt = with_first_layer_spoilt(good)
    settings = context.config.personal.model_copy(update={"tap": TapConfig(final_check=final_check)})
    client = PersonalClient(0, federation.clients[0], validation, personal=spoilt)
    with single_thread():
        state, metrics = METHODS["tap"](settings).after_federation(context, client, good, round_index=4)
        set_adapter_state(context.model, good)
        global_loss = validation_loss(context, validation)
        set_adapter_state(context.model, state)
        personal_loss = validation_loss(context, validation)
    assert metrics["optimizer_steps"] == 2  # stage 2 trained
    taken = all(torch.equal(state[name], good[name]) for name in groups[first])
    if final_check:
        assert first in metrics["final_replaced"] and taken and personal_loss < global_loss + 0.01
    else:
        assert "final_replaced" not in metrics and not taken and personal_loss > global_loss + 0.01
    set_adapter_state(context.model, good)
