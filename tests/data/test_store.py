"""The interaction store: exact token ids, verdict rules, rounds that consume, deletion, retention, migration,
concurrent writers (threads and processes) and a kill -9 in the middle of writing."""

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import spearfl.data.store
from spearfl.data.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Attempt,
    InteractionStore,
    StoreError,
)
from spearfl.io import atomic_write_json, save_tensors


def attempt(text="Answer: B", version=0, prompt_ids=(1, 2, 3), token_ids=(40, 41, 2)):
    return Attempt(prompt_ids=list(prompt_ids), text=text, token_ids=list(token_ids), adapter_version=version)


@pytest.fixture
def store(tmp_path):
    opened = InteractionStore(tmp_path / "interactions.sqlite")
    yield opened
    opened.close()


def test_an_interaction_keeps_its_exact_ids_verdicts_and_hints(store):
    interaction_id = store.add("Which is a fruit?", attempt(token_ids=[7, 0, 65535]), options=["apple", "rock"], owner="ana")
    store.judge(interaction_id, 0, False, hint="it grows on trees", hint_withheld=False)
    revision = Attempt(prompt_ids=[1, 2, 3, 9], text="Answer: apple", token_ids=[50, 51], adapter_version=0, finished_by="eos")
    assert store.add_revision(interaction_id, revision) == 1
    store.judge(interaction_id, 1, True)
    found = store.get(interaction_id)
    assert found.question == "Which is a fruit?" and found.options == ("apple", "rock") and found.owner == "ana"
    assert [a.token_ids for a in found.attempts] == [[7, 0, 65535], [50, 51]]
    assert [a.prompt_ids for a in found.attempts] == [[1, 2, 3], [1, 2, 3, 9]]
    assert [a.verdict for a in found.attempts] == [False, True]
    assert [a.finished_by for a in found.attempts] == ["length", "eos"]
    assert found.first.hint == "it grows on trees" and not found.first.hint_withheld
    assert found.consumed_round is None


def test_bad_requests_are_refused_and_store_nothing(store):
    interaction_id = store.add("q", attempt())
    with pytest.raises(StoreError, match="no interaction nope"):
        store.judge("nope", 0, True)
    with pytest.raises(StoreError, match="has no attempt 3"):
        store.judge(interaction_id, 3, True)
    with pytest.raises(StoreError, match="not judged yet"):
        store.add_revision(interaction_id, attempt())
    store.judge(interaction_id, 0, True)
    with pytest.raises(StoreError, match="already judged"):
        store.judge(interaction_id, 0, False, hint="changed my mind")
    with pytest.raises(StoreError, match="judged right"):
        store.add_revision(interaction_id, attempt())
    found = store.get(interaction_id)
    assert len(found.attempts) == 1 and found.first.verdict is True and found.first.hint is None


def test_a_round_consumes_only_what_it_claimed_and_only_once_confirmed(store):
    ids = [store.add(f"q{index}", attempt()) for index in range(4)]
    for interaction_id in ids[:3]:
        store.judge(interaction_id, 0, True)
    assert [i.id for i in store.pending()] == ids[:3]  # the unjudged one is not ready
    store.claim(1, ids[:2])
    store.release(1)  # the round failed: nothing consumed
    assert [i.id for i in store.pending()] == ids[:3]
    store.claim(2, ids[:2])
    assert store.claimed_rounds() == [2]
    assert [i.id for i in store.pending()] == [ids[2]]  # claimed: no other round sees them until round 2 settles
    assert store.count_pending() == 1
    assert store.confirm(2) == 2
    assert [i.id for i in store.pending()] == [ids[2]]
    assert store.get(ids[0]).consumed_round == 2 and store.claimed_rounds() == []
    store.claim(3, ids[:3])  # a consumed interaction is never consumed again
    assert store.confirm(3) == 1 and store.get(ids[0]).consumed_round == 2


def test_a_deleted_interaction_is_never_trained_on(store):
    ids = [store.add(f"q{index}", attempt(), owner="ana" if index else "ben") for index in range(3)]
    for interaction_id in ids:
        store.judge(interaction_id, 0, False)
    store.claim(5, ids)
    with pytest.raises(StoreError, match="no interaction"):
        store.delete(ids[1], owner="ben")  # only its owner may delete it
    store.delete(ids[1], owner="ana")
    assert store.confirm(5) == 2
    assert ids[1] not in {i.id for i in store.recent()}
    with pytest.raises(StoreError):
        store.get(ids[1])
    assert [i.id for i in store.recent(owner="ana")] == [ids[2]]


def test_retention_drops_old_interactions(store, monkeypatch):
    clock = [1_000_000.0]
    monkeypatch.setattr(spearfl.data.store.time, "time", lambda: clock[0])
    old = store.add("old", attempt())
    clock[0] += 10 * 86_400
    new = store.add("new", attempt())
    clock[0] += 86_400
    assert store.drop_older_than(7 * 86_400) == 1
    assert [i.id for i in store.recent()] == [new]
    with pytest.raises(StoreError):
        store.get(old)


def test_first_try_accuracy_per_adapter_version(store):
    for version, verdicts in ((0, [True, False, False]), (1, [True, True])):
        for verdict in verdicts:
            store.judge(store.add("q", attempt(version=version)), 0, verdict)
    store.add("unjudged", attempt(version=1))
    assert store.first_try_accuracy() == {0: (3, 1), 1: (2, 2)}


def test_a_version_1_file_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("INSERT INTO interactions (id, created_at, question) VALUES ('old', 1.0, 'kept?')")
        db.execute(
            "INSERT INTO attempts (interaction_id, attempt, prompt_ids, text, token_ids, finished_by, adapter_version,"
            " created_at, verdict) VALUES ('old', 0, '[1, 2]', 'Answer: A', '[3]', 'stop', 4, 1.0, 1)"
        )
        db.execute("PRAGMA user_version = 1")
    store = InteractionStore(path)
    assert store.version == SCHEMA_VERSION == 2
    found = store.get("old")
    assert found.owner == "" and found.first.token_ids == [3] and found.first.verdict is True
    assert [i.id for i in store.recent(owner="")] == ["old"]
    store.close()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.sqlite"
    InteractionStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than"):
        InteractionStore(path)


def test_the_file_is_in_wal_mode(store):
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_writers_in_threads_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite"
    stores = [InteractionStore(path) for _ in range(2)]  # two connections, as two services would hold
    written, errors = [], []

    def write(writer):
        try:
            for index in range(25):
                interaction_id = stores[writer % 2].add(f"{writer}-{index}", attempt(token_ids=[writer, index]))
                stores[(writer + 1) % 2].judge(interaction_id, 0, index % 2 == 0)
                written.append(interaction_id)
        except Exception as error:  # noqa: BLE001 - surfaced below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(written) == 200 and {i.id for i in stores[0].recent(limit=1000)} == set(written)
    assert all(i.first.verdict is not None for i in stores[1].pending())
    assert len(stores[1].pending()) == 200
    for opened in stores:
        opened.close()


def write_in_process(path, writer, count):
    store = InteractionStore(path)
    for index in range(count):
        store.judge(store.add(f"{writer}-{index}", attempt(token_ids=[writer, index])), 0, True)
    store.close()


def test_concurrent_writers_in_processes_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite"
    InteractionStore(path).close()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=write_in_process, args=(path, writer, 30)) for writer in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    store = InteractionStore(path)
    found = store.recent(limit=1000)
    assert len(found) == 90
    assert sorted(tuple(i.first.token_ids) for i in found) == sorted((w, i) for w in range(3) for i in range(30))
    store.close()


WRITER = textwrap.dedent("""
    import sys
    from spearfl.data.store import Attempt, InteractionStore
    store = InteractionStore(sys.argv[1])
    index = 0
    while True:
        first = Attempt(prompt_ids=list(range(200)), text="x" * 2000, token_ids=list(range(300)), adapter_version=index)
        interaction_id = store.add(f"q{index}", first)
        print(interaction_id, flush=True)  # printed only once committed
        index += 1
""")


def test_kill_9_while_writing_loses_no_committed_interaction_and_leaves_no_half_row(tmp_path):
    path = tmp_path / "killed.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        committed = []
        deadline = time.monotonic() + 60
        while len(committed) < 40 and time.monotonic() < deadline:
            committed.append(writer.stdout.readline().strip())
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        committed += [line.strip() for line in writer.stdout.read().splitlines() if line.strip()]
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert len(committed) >= 40
    store = InteractionStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        half = db.execute(
            "SELECT COUNT(*) FROM interactions i LEFT JOIN attempts a ON a.interaction_id = i.id WHERE a.interaction_id IS NULL"
        ).fetchone()[0]
    assert half == 0
    found = {i.id: i for i in store.recent(limit=100_000)}
    assert set(committed) <= found.keys()
    assert all(found[i].first.token_ids == list(range(300)) and len(found[i].first.text) == 2000 for i in committed)
    store.close()


def test_a_hint_that_gave_the_answer_is_marked(store):
    interaction_id = store.add("6 x 7?", attempt())
    store.judge(interaction_id, 0, False, hint="it is 42")
    store.mark_hint_gave_answer(interaction_id, 0)
    assert store.get(interaction_id).first.hint_gave_answer
    with pytest.raises(StoreError, match="no attempt 1"):
        store.mark_hint_gave_answer(interaction_id, 1)


def mode_of(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_the_store_its_companions_and_saved_adapters_are_private_whatever_the_umask(tmp_path):
    previous = os.umask(0)  # the most permissive umask: nothing below may rely on it
    try:
        path = tmp_path / "interactions.sqlite"
        store = InteractionStore(path)
        store.add("Which is a fruit?", attempt())
        files = sorted(tmp_path.glob("interactions.sqlite*"))
        assert [file.name for file in files] == ["interactions.sqlite", "interactions.sqlite-shm", "interactions.sqlite-wal"]
        assert {file.name: mode_of(file) for file in files} == dict.fromkeys((file.name for file in files), 0o600)
        store.close()
        os.chmod(path, 0o644)  # a store an older spearfl left world-readable is narrowed when opened
        InteractionStore(path).close()
        assert mode_of(path) == 0o600
        atomic_write_json(tmp_path / "interactions.orders.json", {"1": "nonce"}, mode=0o600)
        save_tensors(tmp_path / "adapter.safetensors", {"x": torch.zeros(2)})
        assert mode_of(tmp_path / "interactions.orders.json") == 0o600 and mode_of(tmp_path / "adapter.safetensors") == 0o600
        atomic_write_json(tmp_path / "summary.json", {"shared": True})  # results for sharing keep their mode
        assert mode_of(tmp_path / "summary.json") == 0o644
    finally:
        os.umask(previous)
