"""The attack bench's replay over a small recorded federation: ten clients a round whose honest LoRA updates share
a direction and differ by their own drift."""

import pytest
import torch

from spearfl.io import save_tensors
from spearfl.tools.attack_bench import DEFENSES, REPLAY_ATTACKS, recorded_rounds, replay

SHAPES = {f"model.layers.{layer}.q_proj.lora_{part}.weight": (4, 16) if part == "A" else (16, 4) for layer in range(3) for part in "AB"}


def tensors(seed: int, scale: float = 1.0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    shared = tensors(1)
    for round_index in (1, 2, 3):
        directory = folder / "clients" / f"round_{round_index:04d}"
        global_state = tensors(round_index, 0.1)
        save_tensors(directory / "global.safetensors", global_state)
        for client in range(10):
            drift = tensors(1000 * round_index + client, 0.8)
            save_tensors(directory / f"client_{client}.safetensors", {n: global_state[n] + shared[n] + drift[n] for n in SHAPES})
    return recorded_rounds(folder)


def test_rounds_are_read_in_order_with_their_clients(recorded):
    assert [r.round_index for r in recorded] == [1, 2, 3] and recorded[0].clients == list(range(10))


def test_a_run_without_recorded_updates_says_how_to_record_them(tmp_path):
    with pytest.raises(ValueError, match="keep_client_updates"):
        recorded_rounds(tmp_path)


def test_no_attack_no_damage_and_no_flags(recorded):
    figures = replay(recorded, "sign_flip", 0.0, DEFENSES["two_stage"])
    assert figures["damage"] == pytest.approx(0.0, abs=1e-6) and figures["false_positive_rate"] == 0.0
    assert figures["true_positive_rate"] is None and figures["malicious_clients"] == 0


@pytest.mark.parametrize("attack", REPLAY_ATTACKS)
def test_two_stage_catches_each_replayed_attack_at_once(recorded, attack):
    figures = replay(recorded, attack, 0.2, DEFENSES["two_stage"])
    assert figures["malicious_clients"] == 2 and figures["true_positive_rate"] == 1.0
    assert figures["false_positive_rate"] == 0.0 and figures["rounds_until_detection"] == 1.0
    undefended = replay(recorded, attack, 0.2, DEFENSES["mean"])
    assert figures["damage"] < undefended["damage"] and undefended["true_positive_rate"] is None


def test_the_median_flags_nobody_but_limits_the_damage(recorded):
    median, mean = (replay(recorded, "model_replacement", 0.2, DEFENSES[name]) for name in ("median", "mean"))
    assert median["true_positive_rate"] is None and median["damage"] < 0.5 < mean["damage"]
