"""spearfl live-demo on the tiny model: the simulation's rounds through device services, people asking each chosen
device exactly the questions the in-process run draws for it."""

from helpers import end_to_end_assets, read_history, single_thread, write_run_config

from spearfl.algorithms.base import sample_examples
from spearfl.config import load_config
from spearfl.data.store import InteractionStore
from spearfl.runtime.server import choose_clients
from spearfl.runtime.setup import prepare_data
from spearfl.seeds import derive_seed
from spearfl.serve.live_demo import live_demo


def test_the_live_demo_asks_the_simulations_questions_and_trains_on_them(tmp_path):
    assets = end_to_end_assets()
    config = load_config(write_run_config(assets, tmp_path / "run.yaml", tmp_path / "live"), ["server.rounds=1", "eval.methods=[loglik]"])
    with single_thread():
        summary = live_demo(config, people=2, base_port=0, show_progress=False)
    assert summary["rounds"] == 1
    history = read_history(tmp_path / "live")
    chosen = choose_clients(config, 1)
    assert sorted(row["client"] for row in history[1]["clients"]) == chosen
    federation = prepare_data(config)
    for client in range(config.data.num_clients):
        store = InteractionStore(tmp_path / "live" / "devices" / f"device{client}.sqlite")
        asked = sorted(interaction.question for interaction in store.recent(limit=1000))
        expected = sorted(e.question for e in sample_examples(
            federation.clients[client], config.client.prompts_per_round, derive_seed(config.seed, 1, client, "prompts")
        )) if client in chosen else []
        assert asked == expected
        row = next((row for row in history[1]["clients"] if row["client"] == client), None)
        if row is not None:
            assert row["metrics"]["pending"] == config.client.prompts_per_round and row["metrics"]["generations"] == 0
            assert {i.consumed_round for i in store.recent()} == ({1} if row["weight"] > 0 else {None})
        store.close()
