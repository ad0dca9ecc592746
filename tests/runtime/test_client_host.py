"""The long-lived client host keeps its model across requests, and reloads it when a run needs another one."""

from helpers import build_tiny_model, make_config

import spearfl.runtime.client as client
from spearfl.lm.models import frozen_lora_state


def host_loading_tiny_models(tokenizer, monkeypatch) -> client.ClientHost:
    monkeypatch.setattr(client, "load_base_model", lambda settings: (build_tiny_model(tokenizer, seed=0), tokenizer))
    return client.ClientHost()


def test_a_second_run_with_the_same_model_and_lora_reuses_the_loaded_model(tokenizer, monkeypatch):
    host = host_loading_tiny_models(tokenizer, monkeypatch)
    host.context_for(make_config("seed=1"))
    host.context_for(make_config("seed=2"))  # A travels with the adapter: the seed's own A is not needed
    assert host.models_loaded == 1


def test_an_ffa_run_with_another_seed_gets_that_seeds_shared_a(tokenizer, monkeypatch):
    """FFA-LoRA never sends A, so a host serving a run of another seed must not keep the last run's A."""
    host = host_loading_tiny_models(tokenizer, monkeypatch)
    first = frozen_lora_state(host.context_for(make_config("seed=1", "lora.ffa=true")).model)
    again = frozen_lora_state(host.context_for(make_config("seed=1", "lora.ffa=true")).model)
    other = frozen_lora_state(host.context_for(make_config("seed=2", "lora.ffa=true")).model)
    assert host.models_loaded == 2
    assert all((first[name] == again[name]).all() for name in first)
    assert any((first[name] != other[name]).any() for name in first)
