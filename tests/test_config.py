from pathlib import Path

import pytest

from spearfl.config import ConfigError, RunConfig, load_config, parse_override
from spearfl.runtime.setup import check_config

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPOSITORY / "configs").rglob("*.yaml"))


def error_of(path=None, overrides=()):
    with pytest.raises(ConfigError) as caught:
        load_config(path, list(overrides))
    return str(caught.value)


def test_defaults_validate_and_follow_the_reference_configs():
    config = load_config()
    assert isinstance(config, RunConfig)
    assert (config.spear.lambda_win, config.spear.lambda_lose, config.spear.lambda_anchor) == (1.0, 0.1, 0.0)
    assert config.spear.margin == 0.3 and config.spear.num_revisions == 2
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (16, 32.0, 0.1)
    assert config.optimizer.lr == 5e-5


def test_unknown_key_fails_naming_it():
    message = error_of(overrides=["spear.lamda_lose=0.2"])
    assert "spear.lamda_lose" in message


def test_unknown_section_and_top_level_key_fail_naming_them(tmp_path):
    assert "sever" in error_of(overrides=["sever.rounds=3"])
    path = tmp_path / "typo.yaml"
    path.write_text("seed: 1\nrounds: 3\n")
    assert "rounds" in error_of(path)


def test_clients_per_round_above_num_clients_fails_naming_the_fields():
    message = error_of(overrides=["server.clients_per_round=5", "data.num_clients=2"])
    assert "server.clients_per_round" in message and "data.num_clients" in message


@pytest.mark.parametrize(
    "override, field",
    [
        ("generation.top_p=2", "generation.top_p"),
        ("generation.temperature=-1", "generation.temperature"),
        ("spear.margin=1.5", "spear.margin"),
        ("spear.local_steps=0", "spear.local_steps"),
        ("lora.rank=abc", "lora.rank"),
        ("server.strategy=fedprox", "server.strategy"),
        ("eval.methods=[loglik, guess]", "eval.methods"),
        ("data.min_per_client=10", "data"),  # above max_per_client below
    ],
)
def test_bad_value_fails_naming_the_field(override, field):
    overrides = [override] + (["data.max_per_client=5"] if override.startswith("data.min") else [])
    assert field in error_of(overrides=overrides)


def test_several_bad_fields_are_all_named():
    message = error_of(overrides=["generation.top_p=2", "spear.margin=-1"])
    assert "generation.top_p" in message and "spear.margin" in message


def test_override_values_are_read_as_yaml():
    assert parse_override("server.rounds=3") == (["server", "rounds"], 3)
    assert parse_override("optimizer.lr=0.001") == (["optimizer", "lr"], 0.001)
    assert parse_override("eval.methods=[loglik]") == (["eval", "methods"], ["loglik"])
    assert parse_override("optimizer.max_grad_norm=null") == (["optimizer", "max_grad_norm"], None)
    assert parse_override("prompt.answer_prefix=true") == (["prompt", "answer_prefix"], True)
    assert parse_override("model.name=a=b") == (["model", "name"], "a=b")  # only the first "=" splits
    config = load_config(
        None,
        ["server.rounds=3", "optimizer.lr=1e-3", "eval.methods=[loglik]", "optimizer.max_grad_norm=null",
         "spear.protected_strings=[\"Answer:\", \"Final:\"]", "model.name=some/model"],
    )
    assert config.server.rounds == 3 and config.optimizer.lr == 1e-3  # YAML 1.1 reads 1e-3 as text; the field coerces it
    assert config.eval.methods == ["loglik"] and config.optimizer.max_grad_norm is None
    assert config.spear.protected_strings == ["Answer:", "Final:"]
    assert config.model.name == "some/model"


@pytest.mark.parametrize("text", ["server.rounds", "server..rounds=3", "=3"])
def test_malformed_overrides_fail(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_override_cannot_descend_into_a_value():
    assert "seed" in error_of(overrides=["seed.value=3"])


def test_base_inheritance_merges_sections_and_overrides_win(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "root.yaml").write_text("seed: 3\nserver: {rounds: 10, clients_per_round: 2}\nspear: {margin: 0.2}\n")
    (tmp_path / "presets" / "middle.yaml").write_text("base: ../root.yaml\nserver: {rounds: 20}\n")
    (tmp_path / "presets" / "leaf.yaml").write_text("base: middle.yaml\nspear: {local_steps: 7}\n")
    config = load_config(tmp_path / "presets" / "leaf.yaml", ["server.strategy=fedadam"])
    assert config.seed == 3
    assert config.server.rounds == 20 and config.server.clients_per_round == 2 and config.server.strategy == "fedadam"
    assert config.spear.margin == 0.2 and config.spear.local_steps == 7


def test_a_cycle_of_bases_fails_with_a_config_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed: 2\n")
    assert "base" in error_of(tmp_path / "a.yaml")


def test_missing_file_and_non_mapping_yaml_fail(tmp_path):
    assert "not found" in error_of(tmp_path / "absent.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert "mapping" in error_of(listed)


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.dataset=no_such_dataset", "data.dataset"),
        ("data.dataset=jsonl:/no/such/file.jsonl", "data.dataset"),
        ("feedback.hint=tell_the_answer", "feedback.hint"),
        ("algorithm=magic", "algorithm"),
    ],
)
def test_check_config_names_unknown_registry_values(override, field):
    config = load_config(None, [override])
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    assert str(caught.value).startswith(field)


def test_check_config_accepts_registered_values(tmp_path):
    dataset = tmp_path / "tiny.jsonl"
    dataset.write_text('{"question": "2 + 2?", "answer": 4}\n')
    check_config(load_config(None, [f"data.dataset=jsonl:{dataset}", "feedback.hint=facts"]))
    check_config(load_config())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_every_shipped_config_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(REPOSITORY)  # jsonl: datasets in configs are relative to the repository
    config = load_config(path)
    check_config(config)


def test_every_method_gets_the_client_budget_unless_it_sets_its_own():
    config = load_config(None, ["client.prompts_per_round=12", "client.local_steps=3", "grpo.prompts_per_round=20"])
    assert (config.budget("spear").prompts_per_round, config.budget("spear").local_steps) == (12, 3)
    assert (config.budget("opsd").prompts_per_round, config.budget("rltf_sd").local_steps) == (12, 3)
    assert (config.budget("grpo").prompts_per_round, config.budget("grpo").local_steps) == (20, 3)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_every_preset_gives_every_method_the_same_budget(path, monkeypatch):
    monkeypatch.chdir(REPOSITORY)
    config = load_config(path)
    budgets = {section: config.budget(section) for section in ("spear", "grpo", "opsd", "rltf_sd")}
    assert len({(budget.prompts_per_round, budget.local_steps) for budget in budgets.values()}) == 1, budgets


def test_grpo_passes_need_a_step_each():
    with pytest.raises(ConfigError, match="grpo.passes"):
        load_config(None, ["client.local_steps=2", "grpo.passes=3"])


SECURE = "server.secure_aggregation=secaggplus"


def test_secure_aggregation_is_off_by_default_and_validates_with_its_settings():
    assert RunConfig().server.secure_aggregation == "none"
    config = load_config(None, [SECURE, "privacy.mode=local", "server.secaggplus.clipping_range=6"])
    assert config.server.secaggplus.num_shares == 1.0 and config.server.secaggplus.quantization_range == 2**22
    assert isinstance(load_config(None, [SECURE, "server.secaggplus.num_shares=3"]).server.secaggplus.num_shares, int)


@pytest.mark.parametrize(
    "override, named",
    [
        ("defense.screening=two_stage", "defense.screening 'two_stage' scores single updates"),
        ("defense.aggregator=median", "defense.aggregator 'median' combines single updates"),
        ("privacy.mode=central", "privacy.mode central clips single updates at the server; use local"),
        ("server.keep_client_updates=true", "server.keep_client_updates true would store single updates"),
        ("server.upload_encoding=bfloat16", "server.upload_encoding bfloat16 does not apply"),
        ("server.clients_per_round=2", "server.clients_per_round (2) must be at least 3"),
        ("server.secaggplus.num_shares=4", "server.secaggplus.num_shares (4) exceeds server.clients_per_round (3)"),
        ("server.secaggplus.quantization_range=2147483648", "server.secaggplus.quantization_range (2147483648) times"),
        ("privacy.mode=local", "server.secaggplus.clipping_range (1.0) would clip local DP's noise"),
        ("server.secaggplus.num_shares=2", "num_shares 2: a count above 2"),
        ("server.secaggplus.reconstruction_threshold=1.5", "reconstruction_threshold 1.5"),
    ],
)
def test_secure_aggregation_refuses_what_reads_single_updates_naming_the_field(override, named):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [SECURE, override])
    assert named in str(caught.value)
    if "secaggplus" not in override:
        load_config(None, [override])  # fine without secure aggregation


def test_the_local_runtime_refuses_secure_aggregation_saying_it_needs_flower(tmp_path):
    from spearfl.runtime.local import run_local

    config = load_config(None, [SECURE, f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="needs the Flower runtime"):
        run_local(config, show_progress=False)
    assert not (tmp_path / "run").exists()
