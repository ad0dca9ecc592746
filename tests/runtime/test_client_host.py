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


def test_a_worker_with_its_own_config_refuses_a_work_order_that_sets_its_verifier(tokenizer, monkeypatch):
    """The client worker's device config is its own: a server-sent `python` verifier never reaches an import."""
    import pytest

    from spearfl.errors import UserError
    from spearfl.runtime.client import Device, work_order_config

    host = host_loading_tiny_models(tokenizer, monkeypatch)
    host.device = Device(make_config())
    order = work_order_config(make_config()) | {"feedback": {"provider": "python", "function": "os:system"}}
    with pytest.raises(UserError, match="the work order sets feedback"):
        host.train_arrays({}, {"config": order, "client_id": 0, "round_index": 1, "lr": 0.01})
    assert host.models_loaded == 0
    with pytest.raises(UserError, match="no device config of its own"):
        client.ClientHost().train_arrays({}, {"config": work_order_config(make_config()), "client_id": 0, "round_index": 1, "lr": 0.01})
