"""spearfl serve-bench on the tiny model: every figure is measured and has the shape the table prints."""

from helpers import end_to_end_assets, single_thread, write_run_config

from spearfl.config import load_config
from spearfl.serve.bench import serve_bench


def test_the_service_bench_measures_load_store_and_switch(tmp_path):
    assets = end_to_end_assets()
    config = load_config(write_run_config(assets, tmp_path / "run.yaml", tmp_path / "run"))
    with single_thread():
        figures = serve_bench(config, [1, 3], requests=1)
    assert [(row["concurrency"], row["max_batch"]) for row in figures["load"]] == [(1, 16), (3, 16), (3, 1)]
    for row in figures["load"]:
        assert row["requests"] == row["concurrency"] and row["errors"] == 0
        assert 0 < row["first_token_s_median"] <= row["first_token_s_p95"] and row["total_tokens_per_s"] > 0
    assert figures["store_writes_per_s"] > 0
    assert len(figures["adapter_switch_s"]) == 3 and all(seconds > 0 for seconds in figures["adapter_switch_s"])
