"""The Flower apps without Flower processes: records, reply checks, a round with bad replies, the run config,
and the client worker's HTTP exchange."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import end_to_end_assets, read_history, single_thread, write_run_config

from spearfl.algorithms.base import REPORTED_METRICS
from spearfl.config import ConfigError, load_config
from spearfl.flower.records import (
    InvalidReply,
    adapter_record,
    layout_of,
    metric_values,
    node_content,
    read_reply,
    read_work,
    reply_content,
    work_content,
)
from spearfl.flower.run_config import APP_FOLDER
from spearfl.flower.server_app import FlowerClients, config_from_run_config
from spearfl.io import load_tensors
from spearfl.runtime.client import wire_array
from spearfl.runtime.server import FederatedRun
from spearfl.runtime.worker import (
    WorkerError,
    make_server,
    pack,
    train_on_worker,
    unpack,
)


def adapter(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"a.lora_A.weight": np.full((2, 3), scale, np.float32), "a.lora_B.weight": np.full((3, 2), -scale, np.float32)}


def good_result(weight: float = 2.0) -> dict:
    return {"weight": weight, "metrics": {key: 4 for key in REPORTED_METRICS} | {"revision_success": float("nan")}}


def test_work_and_reply_round_trip_keep_arrays_and_metrics():
    arrays, request = read_work(work_content(adapter(), {"client_id": 3, "lr": 0.01}))
    assert request == {"client_id": 3, "lr": 0.01}
    assert all(np.array_equal(arrays[name], adapter()[name]) and arrays[name].dtype == np.float32 for name in arrays)
    reply = read_reply(reply_content(adapter(2.0), good_result()), layout_of(adapter()), REPORTED_METRICS)
    assert reply.weight == 2.0 and reply.metrics["scored_tokens"] == 4 and np.isnan(reply.metrics["revision_success"])
    assert np.array_equal(reply.payload["a.lora_A.weight"], adapter(2.0)["a.lora_A.weight"])
    assert reply.payload_bytes == 4 * 12


def test_a_round_that_generated_nothing_may_weigh_its_prompts():
    """A live device trains on answers its people already judged: no completion sampled, every prompt trained on."""
    result = good_result(weight=4.0)
    result["metrics"]["generations"] = 0
    assert read_reply(reply_content(adapter(), result), layout_of(adapter()), REPORTED_METRICS).weight == 4.0


def test_a_weight_zero_reply_needs_no_adapter():
    reply = read_reply(reply_content({}, good_result(weight=0.0)), layout_of(adapter()), REPORTED_METRICS)
    assert reply.payload is None and reply.weight == 0.0 and reply.metrics["prompts"] == 4 and reply.payload_bytes == 0


def test_a_bfloat16_payload_travels_as_bit_patterns_and_is_checked_as_numbers():
    update = {name: torch.from_numpy(array) / 1000 for name, array in adapter(1.5).items()}
    wire = {name: wire_array(tensor.to(torch.bfloat16)) for name, tensor in update.items()}
    assert {array.dtype for array in wire.values()} == {np.dtype(np.uint16)}
    reply = read_reply(reply_content(wire, good_result()), layout_of(adapter(), "bfloat16"), REPORTED_METRICS)
    assert reply.payload_bytes == 2 * 12
    for name, values in reply.payload.items():
        assert torch.equal(torch.from_numpy(values), update[name].to(torch.bfloat16).float())
    wire["a.lora_A.weight"][0, 0] = 0x7FC0  # a bfloat16 NaN
    with pytest.raises(InvalidReply, match="1 values are not finite"):
        read_reply(reply_content(wire, good_result()), layout_of(adapter(), "bfloat16"), REPORTED_METRICS)
    with pytest.raises(InvalidReply, match="expected uint16"):  # float32 sent where bfloat16 was configured
        read_reply(reply_content(adapter(), good_result()), layout_of(adapter(), "bfloat16"), REPORTED_METRICS)


def spoiled(change) -> RecordDict:
    arrays, result = adapter(), good_result()
    change(arrays, result)
    return reply_content(arrays, result)


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda arrays, result: arrays.update({"a.lora_A.weight": np.zeros((2, 4), np.float32)}), "expected float32 (2, 3)"),
        (lambda arrays, result: arrays["a.lora_B.weight"].__setitem__((0, 0), np.nan), "1 values are not finite"),
        (lambda arrays, result: arrays.__setitem__("a.lora_B.weight", np.full((3, 2), np.inf, np.float32)), "not finite"),
        (lambda arrays, result: arrays.pop("a.lora_B.weight"), "1 missing ['a.lora_B.weight']"),
        (lambda arrays, result: arrays.update({"b.lora_A.weight": np.zeros((1,), np.float32)}), "1 unexpected"),
        (lambda arrays, result: arrays.update({"a.lora_A.weight": np.zeros((2, 3), np.float64)}), "float64 (2, 3), expected float32"),
        (lambda arrays, result: result["metrics"].pop("scored_tokens"), "metrics missing ['scored_tokens']"),
        (lambda arrays, result: result["metrics"].update(seconds=float("inf")), "not finite numbers: ['seconds']"),
        (lambda arrays, result: result.update(weight=-1.0), "weight must be a finite number >= 0"),
        (lambda arrays, result: result.update(weight=float("nan")), "weight must be a finite number >= 0"),
        (lambda arrays, result: result.update(weight=5.0), "exceeds the 4 prompts"),
        (lambda arrays, result: arrays.clear(), "but no adapter"),
    ],
)
def test_a_bad_reply_is_rejected_with_its_reason(change, reason):
    with pytest.raises(InvalidReply) as caught:
        read_reply(spoiled(change), layout_of(adapter()), REPORTED_METRICS)
    assert reason in str(caught.value)


def test_a_reply_without_metrics_is_rejected():
    with pytest.raises(InvalidReply, match="no metrics record"):
        read_reply(RecordDict({"adapter": adapter_record(adapter())}), layout_of(adapter()), REPORTED_METRICS)


def test_metrics_must_be_numbers():
    with pytest.raises(TypeError, match="'note'"):
        metric_values({"weight": 1.0, "metrics": {"note": "text"}})
    assert metric_values({"weight": 1, "metrics": {"flag": True}}) == {"weight": 1.0, "flag": 1}


# ------------------------------------------------------------------------- a round with bad replies


class FakeGrid:
    """Four SuperNodes that answer at once: client i on node 100 + i. Client 0 sends its global adapter plus
    one; clients 1-3 send a wrong shape, a NaN and a missing key."""

    def __init__(self):
        self.outbox: dict[str, object] = {}
        self.trained: list[int] = []

    def get_node_ids(self):
        return [100, 101, 102, 103]

    def nonce_for(self, client: int, nonce: str) -> str:
        return nonce  # an honest node echoes its work order's nonce

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"m{len(self.outbox)}"
            self.outbox[message_id] = SimpleNamespace(
                content=self.answer(message), has_error=lambda: False, metadata=SimpleNamespace(reply_to_message_id=message_id)
            )
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(message_id) for message_id in message_ids if message_id in self.outbox]

    def answer(self, message):
        client = message.metadata.dst_node_id - 100
        if message.metadata.message_type == "query":
            content = node_content(client)
        else:
            arrays, request = read_work(message.content)
            assert request["client_id"] == client
            self.trained.append(client)
            arrays = {name: array + 1 for name, array in arrays.items()}
            first = next(iter(arrays))
            if client == 1:
                arrays[first] = arrays[first][:, :-1]
            elif client == 2:
                arrays[first][0, 0] = np.nan
            elif client == 3:
                del arrays[first]
            content = reply_content(arrays, good_result() | {"nonce": self.nonce_for(client, request["nonce"])})
        return content


@pytest.fixture
def task_identity(monkeypatch):
    """Flower builds messages only inside a run; give this process a run, node and task id."""
    for name in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)


def test_a_round_drops_bad_replies_and_aggregates_the_rest(tmp_path, task_identity):
    config = load_config(
        write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "run"),
        ["data.num_clients=4", "server.clients_per_round=4", "server.rounds=1", "eval.methods=[loglik]"],
    )
    grid = FakeGrid()
    with single_thread():
        FederatedRun(config, lambda context, federation, progress: FlowerClients(grid, config, 5.0, 5.0), show_progress=False).run()
    assert sorted(grid.trained) == [0, 1, 2, 3]
    history = read_history(tmp_path / "run")
    row = history[1]
    assert [client["client"] for client in row["clients"]] == [0]
    reasons = {rejected["client"]: rejected["reason"] for rejected in row["rejected"]}
    assert sorted(reasons) == [1, 2, 3]
    assert "expected float32" in reasons[1] and "not finite" in reasons[2] and "1 missing" in reasons[3]
    before = load_adapter(tmp_path / "run", 0)
    after = load_adapter(tmp_path / "run", 1)
    assert all(torch.equal(after[name], before[name] + 1) for name in before)  # FedAvg of the one good reply
    assert row["online"]["upload_bytes"] == sum(t.numel() * 4 for t in before.values())


class ReplayingGrid(FakeGrid):
    """Client 0 answers round 2 with its reply of round 1 (its old nonce)."""

    def __init__(self):
        super().__init__()
        self.first_nonce: dict[int, str] = {}

    def nonce_for(self, client: int, nonce: str) -> str:
        old = self.first_nonce.setdefault(client, nonce)
        return old if client == 0 else nonce


def test_replayed_and_forged_replies_are_rejected(tmp_path, task_identity):
    config = load_config(
        write_run_config(end_to_end_assets(), tmp_path / "run.yaml", tmp_path / "run"),
        ["data.num_clients=4", "server.clients_per_round=4", "server.rounds=2", "eval.methods=[loglik]"],
    )
    with single_thread():
        FederatedRun(config, lambda context, federation, progress: FlowerClients(ReplayingGrid(), config, 5.0, 5.0), show_progress=False).run()
    first, second = read_history(tmp_path / "run")[1:]
    assert [client["client"] for client in first["clients"]] == [0]  # its own nonce in round 1
    reasons = {rejected["client"]: rejected["reason"] for rejected in second["rejected"]}
    assert second["clients"] == [] and "replayed or forged" in reasons[0]


def load_adapter(folder, round_index):
    from spearfl.runtime.run_folder import RunFolder

    return load_tensors(RunFolder(folder).adapter_path(round_index))


# ------------------------------------------------------------------------- run config


def test_the_run_config_names_a_yaml_from_the_app_folder_and_overrides_it():
    config = config_from_run_config({"config": "configs/flower.yaml", "set": "server.rounds=2 seed=5 eval.methods=[loglik]"})
    assert (APP_FOLDER / "configs" / "flower.yaml").is_file()
    assert config.server.rounds == 2 and config.seed == 5 and config.eval.methods == ["loglik"]
    assert config.data.dataset == "basic_skills_common_knowledge"  # from demo.yaml, the base of flower.yaml


def test_a_bad_run_config_names_the_field():
    with pytest.raises(ConfigError, match="server.rounds"):
        config_from_run_config({"config": "configs/flower.yaml", "set": "server.rounds=zero"})
    with pytest.raises(ConfigError, match="not found"):
        config_from_run_config({"config": "configs/nothing.yaml"})


# ------------------------------------------------------------------------- the client worker


def test_payloads_round_trip_and_garbage_is_refused():
    arrays, header = unpack(pack(adapter(), {"request": {"client_id": 1}}))
    assert header == {"request": {"client_id": 1}} and np.array_equal(arrays["a.lora_B.weight"], adapter()["a.lora_B.weight"])
    for garbage in (b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", b"not a payload at all"):
        with pytest.raises(ValueError):
            unpack(garbage)


class RecordingHost:
    def __init__(self):
        self.requests = []
        self.models_loaded = 0

    def train_arrays(self, arrays, request, device=None):
        self.requests.append(request)
        if request["client_id"] < 0:
            raise RuntimeError("no such client")
        return {name: array * 2 for name, array in arrays.items()}, good_result()


def test_the_worker_serves_rounds_and_reports_failures():
    host = RecordingHost()
    server = make_server("127.0.0.1", 0, host)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        state, result = train_on_worker(address, adapter(), {"client_id": 1})
        assert np.array_equal(state["a.lora_A.weight"], adapter(2.0)["a.lora_A.weight"]) and result["weight"] == 2.0
        with pytest.raises(WorkerError, match="RuntimeError: no such client"):
            train_on_worker(address, adapter(), {"client_id": -1})
        assert [request["client_id"] for request in host.requests] == [1, -1]  # still serving after the failure
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(WorkerError, match="unreachable"):
        train_on_worker(address, adapter(), {"client_id": 1})


class ClaimingGrid(FakeGrid):
    """SuperNodes that say which client they are: `claims` maps node id -> the client it claims."""

    def __init__(self, claims: dict[int, int]):
        super().__init__()
        self.claims = claims

    def get_node_ids(self):
        return list(self.claims)

    def answer(self, message):
        return node_content(self.claims[message.metadata.dst_node_id])


def test_a_client_id_belongs_to_the_node_that_first_claimed_it(task_identity):
    config = load_config(None, ["data.num_clients=3", "server.clients_per_round=3"])
    grid = ClaimingGrid({100: 0, 101: 1, 102: 2})
    clients = FlowerClients(grid, config, 5.0, 5.0)
    clients.find_nodes([0, 1, 2], wait=True)
    assert clients.nodes == {0: 100, 1: 101, 2: 102}
    grid.claims = {200: 0, 101: 2, 102: 2}  # node 100 left; a new node squats its id, node 101 switches to 2
    clients.find_nodes([0, 1, 2], wait=False)
    assert clients.nodes == {1: 101, 2: 102}  # client 0 has no node now; 101 keeps its own id, not 2
    grid.claims = {100: 0, 101: 1, 102: 2}  # the owner of client 0 is back
    clients.find_nodes([0, 1, 2], wait=False)
    assert clients.nodes == {0: 100, 1: 101, 2: 102}
    restarted = FlowerClients(ClaimingGrid({200: 0, 101: 1, 102: 2}), config, 5.0, 5.0, persistent_binding=True)
    restarted.restore({"bound": {"0": 100, "1": 101, "2": 102}})  # as the checkpoint keeps it
    restarted.find_nodes([0, 1, 2], wait=False)
    assert restarted.nodes == {1: 101, 2: 102} and restarted.state() == {"bound": {"0": 100, "1": 101, "2": 102}}
