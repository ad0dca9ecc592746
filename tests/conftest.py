"""Shared fixtures: the default tokenizer (offline, from the cache), a tiny random Llama, the same with LoRA."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_model

from spearfl.config import LoraConfig, ModelConfig
from spearfl.lm.models import (
    DEFAULT_MODEL,
    attach_lora,
    load_base_model,
    load_tokenizer,
)

MARKERS = {
    "slow": "takes more than a few seconds",
    "data": "needs the packaged benchmark data sets",
    "flower": "starts Flower (simulation or SuperLink/SuperNodes)",
    "model": "needs the real default model (converted once per machine into the cache)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


@pytest.fixture(scope="session", autouse=True)
def float64_references_stay_float64():
    """transformers' Llama RMSNorm computes in float32 whatever its input: a float64 model, the reference that float32
    results are measured against (`helpers.rounding_excess`), would round to float32 at every norm and carry as much
    error as the result it checks. Here a norm computes in its input's dtype when that is wider than float32, and as
    transformers does otherwise (bfloat16 and float16 widened to float32, float32 as it is)."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm.forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != torch.float64:
            return original(self, hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    modeling_llama.LlamaRMSNorm.forward = forward
    yield
    modeling_llama.LlamaRMSNorm.forward = original


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Run torch on one thread: the tiny test tensors gain nothing from more, and on a small machine shared
    with other processes, torch's threads spin against them (the real-model tests took 5-15x longer on two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer; the first run on a machine converts the packaged model into the cache."""
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh two-layer random Llama over the real vocabulary, frozen (built anew per test: peft edits in place)."""
    return build_tiny_model(tokenizer, seed=0)


@pytest.fixture
def tiny_lora_model(tokenizer):
    """A fresh tiny Llama with a rank-4 LoRA adapter on every projection."""
    return attach_lora(build_tiny_model(tokenizer, seed=0), LoraConfig(rank=4, alpha=8), seed=0)


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the real default model in float32 on the CPU; for tests marked `model`."""
    return load_base_model(ModelConfig(device="cpu"))
