"""The multi-task federation (data.tasks): one config section, checked like the rest, whose clients hold different
tasks with label skew inside each, and each task its own held-out share of the global held-out set."""

import json
from collections import Counter

import pytest

from spearfl.config import ConfigError, config_to_dict, load_config, validate
from spearfl.runtime.setup import check_config, prepare_data


def write_task(path, prefix: str, count: int, options=("a", "b", "c", "d")) -> str:
    with open(path, "w") as handle:
        for index in range(count):
            line = {"id": f"{prefix}/{index}", "question": f"{prefix} question {index}", "options": list(options),
                    "answer": options[index % len(options)]}
            handle.write(json.dumps(line) + "\n")
    return f"jsonl:{path}"


def tasks_config(tmp_path, *overrides: str, counts=(2, 1)):
    first, second = write_task(tmp_path / "one.jsonl", "one", 80), write_task(tmp_path / "two.jsonl", "two", 60)
    tasks = json.dumps([{"dataset": first, "clients": counts[0]}, {"dataset": second, "clients": counts[1], "label_style": "numbers"}])
    return load_config(None, ["data.dataset=null", f"data.tasks={tasks}", f"data.num_clients={sum(counts)}", "data.heldout_size=10",
                              "data.min_per_client=10", "data.max_per_client=30", "data.dirichlet_alpha=0.2", *overrides])


def test_each_client_holds_one_task_and_each_task_its_share_of_the_held_out_set(tmp_path):
    config = tasks_config(tmp_path, "data.client_heldout_fraction=0.25")
    check_config(config)
    federation = prepare_data(config)
    tasks_of = [{example.uid.split("/")[0] for example in pool} for pool in federation.clients]
    assert tasks_of == [{"one"}, {"one"}, {"two"}]  # clients numbered in the order the tasks are listed
    assert Counter(example.uid.split("/")[0] for example in federation.heldout) == {"one": 10, "two": 10}
    assert [{e.uid.split("/")[0] for e in held} for held in federation.client_heldout] == tasks_of
    assert {e.label_style for e in federation.clients[2]} == {"numbers"} and {e.label_style for e in federation.clients[0]} == {"letters"}
    trained = {e.uid for pool in federation.clients for e in pool}
    held = {e.uid for e in federation.heldout} | {e.uid for pools in federation.client_heldout for e in pools}
    assert not trained & held  # nothing held out is trained on
    # label skew inside a task: at alpha 0.2 a client's most common answer holds well over a uniform quarter
    assert max(Counter(e.gold for e in federation.clients[0]).values()) > 0.4 * len(federation.clients[0])
    assert config_to_dict(validate(config_to_dict(config))) == config_to_dict(config)  # a run folder's config reads back


@pytest.mark.parametrize(
    "change, message",
    [
        (["data.num_clients=4"], "data.tasks hold 3 clients in all, but data.num_clients is 4"),
        (["data.dataset=arc_easy"], "data.dataset and data.tasks exclude each other"),
    ],
)
def test_a_bad_tasks_section_is_refused_with_the_field_named(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        tasks_config(tmp_path, *change)


def test_a_task_listed_twice_or_unknown_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, ["data.dataset=null", 'data.tasks=[{"dataset": "sciq", "clients": 1}, {"dataset": "sciq", "clients": 1}]',
                           "data.num_clients=2", "server.clients_per_round=1"])
    config = load_config(None, ["data.dataset=null", 'data.tasks=[{"dataset": "sciq", "clients": 1}, {"dataset": "nope", "clients": 1}]',
                                "data.num_clients=2", "server.clients_per_round=1"])
    with pytest.raises(ConfigError, match=r"data.tasks\[1\].dataset: unknown 'nope'"):
        check_config(config)


def test_a_task_too_small_for_its_clients_names_the_task(tmp_path):
    config = tasks_config(tmp_path, "data.min_per_client=30", counts=(1, 3))
    with pytest.raises(ConfigError, match=r"data.tasks\[1\] \(jsonl:.*two.jsonl\): 3 clients x 30 examples"):
        prepare_data(config)
