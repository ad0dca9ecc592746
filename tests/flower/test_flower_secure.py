"""Secure aggregation without Flower processes: the legacy records, the strategy adapter, the client mod, and whole
SecAgg+ rounds whose client side (Flower's real mod around a stand-in for training) runs in this process."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres
from flwr.supercore.task_identity import TaskIdentity

from spearfl.algorithms.base import REPORTED_METRICS
from spearfl.config import load_config
from spearfl.flower.client_app import secure_aggregation_mod
from spearfl.flower.records import (
    InvalidReply,
    is_secure_work,
    node_content,
    read_aggregate,
    read_secure_reply,
    read_secure_work,
    secure_reply_content,
    secure_work,
    work_content,
)
from spearfl.flower.secure import NodeProxy, RoundStrategy
from spearfl.flower.server_app import FlowerClients

ASKED = 4  # prompts a client round, the largest weight
CLIP = 1.0  # server.secaggplus.clipping_range's default
STEP = 2 * CLIP / 2**22  # one quantization step of a client's weighted update


def adapter(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"b.lora_B.weight": np.full((3, 2), -scale, np.float32), "a.lora_A.weight": np.full((2, 3), scale, np.float32)}


def result(weight: float = 2.0, nonce: str = "n") -> dict:
    return {"weight": weight, "metrics": {key: ASKED for key in REPORTED_METRICS}, "nonce": nonce}


@pytest.fixture
def task_identity(monkeypatch):
    """Flower builds messages only inside a run; give this process a run, node and task id."""
    for name in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)


# ------------------------------------------------------------------------- records


def test_a_secure_work_order_round_trips_with_names_in_a_fixed_order():
    content = fitins_to_recorddict(secure_work(adapter(), {"client_id": 2, "nonce": "abc"}), keep_input=True)
    assert is_secure_work(content) and not is_secure_work(work_content(adapter(), {}))
    arrays, request = read_secure_work(content)
    assert request == {"client_id": 2, "nonce": "abc"} and list(arrays) == ["a.lora_A.weight", "b.lora_B.weight"]
    assert all(np.array_equal(arrays[name], adapter()[name]) for name in adapter())


def test_a_secure_reply_carries_the_update_the_weight_and_the_clear_metrics():
    trained = {name: array + 0.25 for name, array in adapter().items()}
    fit_res = recorddict_to_fitres(secure_reply_content(trained, adapter(), result(3.0, "xyz")), keep_input=True)
    names = sorted(adapter())
    update = _arrays(fit_res.parameters)
    assert [u.shape for u in update] == [adapter()[name].shape for name in names]
    assert all(np.allclose(u, 0.25) for u in update)  # the update, not the adapter
    weight, metrics, nonce = read_secure_reply(fit_res, ASKED, REPORTED_METRICS)
    assert (weight, nonce, metrics["prompts"]) == (3.0, "xyz", ASKED)
    idle = recorddict_to_fitres(secure_reply_content({}, adapter(), result(0.0)), keep_input=True)
    assert idle.num_examples == 0 and all(not a.any() for a in _arrays(idle.parameters))


def _arrays(parameters: Parameters) -> list[np.ndarray]:
    from flwr.common import parameters_to_ndarrays

    return parameters_to_ndarrays(parameters)


@pytest.mark.parametrize(
    "weight, metrics, reason",
    [
        (ASKED + 1, {}, "exceeds the 4 prompts asked for"),
        (-1.0, {}, "weight must be a finite number >= 0"),
        (1.0, {"drop": "scored_tokens"}, "metrics missing ['scored_tokens']"),
    ],
)
def test_the_clear_part_of_a_secure_reply_is_checked(weight, metrics, reason):
    values = {key: ASKED + 1 for key in REPORTED_METRICS if key != metrics.get("drop")}
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), weight, values)
    with pytest.raises(InvalidReply, match=reason.replace("[", r"\[").replace("]", r"\]")):
        read_secure_reply(fit_res, ASKED, REPORTED_METRICS)


@pytest.mark.parametrize(
    "arrays, reason",
    [
        ([np.zeros((2, 3))], "has 1 arrays, the adapter 2"),
        ([np.zeros((3, 2)), np.zeros((3, 2))], "has shape (3, 2), expected (2, 3)"),
        ([np.zeros((2, 3)), np.full((3, 2), np.nan)], "6 values that are not finite"),
    ],
)
def test_an_aggregate_of_the_wrong_shape_or_not_finite_is_refused(arrays, reason):
    with pytest.raises(InvalidReply) as caught:
        read_aggregate(ndarrays_to_parameters(arrays), adapter())
    assert reason in str(caught.value)
    good = read_aggregate(ndarrays_to_parameters([np.ones((2, 3)), np.zeros((3, 2))]), adapter())
    assert good["a.lora_A.weight"].dtype == np.float32 and good["a.lora_A.weight"].sum() == 6


# ------------------------------------------------------------------------- the strategy adapter and the mod


def test_the_strategy_hands_out_the_work_and_keeps_what_comes_back():
    work = {11: secure_work(adapter(), {"client_id": 0}), 12: secure_work(adapter(), {"client_id": 1})}
    strategy = RoundStrategy(work)
    pairs = strategy.configure_fit(3, Parameters([], ""), client_manager=None)
    assert [(proxy.node_id, fit_ins) for proxy, fit_ins in pairs] == list(work.items())
    results = [(NodeProxy(11), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 2, {}))]
    assert strategy.results is None
    assert strategy.aggregate_fit(3, results, []) == (None, {})  # the workflow writes no new parameters
    assert strategy.results == results


def test_messages_without_a_secaggplus_stage_pass_the_mod_unchanged(task_identity):
    seen = []

    def handler(message, context):
        seen.append(message)
        return "answer"

    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    for message_type, content in ((MessageType.TRAIN, work_content(adapter(), {})), (MessageType.QUERY, node_content(0))):
        message = Message(content, dst_node_id=5, message_type=message_type)
        assert secure_aggregation_mod(message, context, handler) == "answer"
        assert seen[-1] is message and message.content is content
    assert len(context.state.config_records) == 0  # the SecAgg+ state was never touched
    stage = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP, **setup_configs()})})
    reply = secure_aggregation_mod(Message(stage, dst_node_id=5, message_type=MessageType.TRAIN), context, handler)
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS] and len(seen) == 2


def setup_configs() -> dict:
    return {
        Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: CLIP,
        Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: float(ASKED),
    }


# ------------------------------------------------------------------------- whole rounds, clients in this process


class SecureGrid:
    """Client i on node 100 + i: Flower's SecAgg+ mod (through spearfl's) around a stand-in for training that
    adds `shift[i]` to every weight and reports `weights[i]`. Nodes in `silent` stop answering at `silent_from`."""

    def __init__(self, weights: dict[int, float], shift: dict[int, float], silent=(), silent_from=Stage.COLLECT_MASKED_VECTORS):
        self.weights, self.shift = weights, shift
        self.silent, self.silent_from = set(silent), silent_from
        self.contexts = {100 + c: Context(run_id=1, node_id=100 + c, node_config={}, state=RecordDict(), run_config={}) for c in weights}
        self.outbox: dict[str, object] = {}
        self.nonce_override: dict[int, str] = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"m{len(self.outbox)}-{id(message)}"
            reply = self.answer(message)
            if reply is not None:
                self.outbox[message_id] = SimpleNamespace(
                    content=reply.content, has_error=lambda: False,
                    metadata=SimpleNamespace(reply_to_message_id=message_id, src_node_id=message.metadata.dst_node_id),
                )
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(message_id) for message_id in message_ids if message_id in self.outbox]

    def answer(self, message):
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.QUERY:
            return Message(node_content(node - 100), reply_to=message)
        stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        if node in self.silent and Stage.all().index(stage) >= Stage.all().index(self.silent_from):
            return None
        # each node gets its own copy, as over the wire (the workflow sends one content to many, the mod edits it)
        delivered = Message(copy.deepcopy(message.content), dst_node_id=node, message_type=message.metadata.message_type)
        return secure_aggregation_mod(delivered, self.contexts[node], self.train)

    def train(self, message, context):
        arrays, request = read_secure_work(message.content)
        client = request["client_id"]
        trained = {name: array + self.shift[client] for name, array in arrays.items()}
        nonce = self.nonce_override.get(client, request["nonce"])
        return Message(secure_reply_content(trained, arrays, result(self.weights[client], nonce)), reply_to=message)


def secure_config(num_clients: int):
    return load_config(None, [
        f"data.num_clients={num_clients}", f"server.clients_per_round={num_clients}", "server.secure_aggregation=secaggplus",
        f"client.prompts_per_round={ASKED}",
    ])


def global_state() -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in adapter(0.5).items()}


def secure_round(grid: SecureGrid, num_clients: int):
    clients = FlowerClients(grid, secure_config(num_clients), reply_timeout=0.5, connect_timeout=5.0)
    return clients.train(1, list(range(num_clients)), global_state(), lr=0.01)


def test_a_secure_round_yields_the_weighted_mean_of_the_updates(task_identity):
    weights, shift = {0: 4.0, 1: 1.0, 2: 2.0, 3: 0.0}, {0: 0.01, 1: -0.03, 2: 0.002, 3: 0.5}
    replies = secure_round(SecureGrid(weights, shift), 4)
    assert replies.rejected == [] and [client for client, _ in replies.results] == [0, 1, 2, 3]
    expected = sum(weights[c] * shift[c] for c in weights) / sum(weights.values())  # client 3 trained nothing
    # each client's weighted update is rounded to a step of 2 clip / 2**22; the mean divides the sum by the weight share
    tolerance = len(weights) * STEP / (sum(weights.values()) / ASKED)
    for _, client_result in replies.results:
        for name, tensor in client_result.state.items():
            assert torch.allclose(tensor - global_state()[name], torch.full_like(tensor, expected), rtol=0, atol=tolerance)
            assert not torch.allclose(tensor, global_state()[name])
        assert client_result.metrics["upload_bytes"] > 0
    assert [r.weight for _, r in replies.results] == list(weights.values())
    assert {id(r.state) for _, r in replies.results} == {id(replies.results[0][1].state)}  # one aggregate for all


def test_a_client_that_drops_out_while_training_is_named_and_left_out(task_identity):
    weights, shift = {0: 4.0, 1: 4.0, 2: 4.0, 3: 4.0}, {0: 0.01, 1: 0.02, 2: 0.03, 3: 0.9}
    replies = secure_round(SecureGrid(weights, shift, silent={103}), 4)
    assert [client for client, _ in replies.results] == [0, 1, 2]
    assert replies.rejected == [{"client": 3, "reason": "dropped out of secure aggregation: no reply to stage collect_masked_vectors within 0.5 s"}]
    state = replies.results[0][1].state
    assert all(torch.allclose(state[name] - global_state()[name], torch.full_like(state[name], 0.02), atol=3 * STEP) for name in state)


def test_a_client_that_drops_out_while_unmasking_still_counts(task_identity):
    """Its masked update is in the sum already; its neighbours' shares remove its mask."""
    weights, shift = {0: 4.0, 1: 4.0, 2: 4.0, 3: 4.0}, {0: 0.01, 1: 0.02, 2: 0.03, 3: 0.04}
    replies = secure_round(SecureGrid(weights, shift, silent={103}, silent_from=Stage.UNMASK), 4)
    assert [client for client, _ in replies.results] == [0, 1, 2, 3] and replies.rejected == []
    state = replies.results[0][1].state
    assert all(torch.allclose(state[name] - global_state()[name], torch.full_like(state[name], 0.025), atol=4 * STEP) for name in state)


def test_too_many_dropouts_stop_the_round_and_name_every_client(task_identity):
    replies = secure_round(SecureGrid({c: 4.0 for c in range(3)}, {c: 0.01 for c in range(3)}, silent={101, 102}), 3)
    assert replies.results == []
    reasons = {entry["client"]: entry["reason"] for entry in replies.rejected}
    assert sorted(reasons) == [0, 1, 2]
    assert "no reply to stage collect_masked_vectors" in reasons[1] and "stopped before unmasking" in reasons[0]


def test_a_forged_nonce_voids_the_round_its_update_cannot_be_taken_out(task_identity):
    grid = SecureGrid({c: 4.0 for c in range(3)}, {0: 0.01, 1: 0.02, 2: 0.5})
    grid.nonce_override[2] = "forged"
    replies = secure_round(grid, 3)
    assert replies.results == []
    reasons = {entry["client"]: entry["reason"] for entry in replies.rejected}
    assert "replayed or forged" in reasons[2] and "so the round aggregates nothing" in reasons[2]
    assert "the update of client(s) [2]" in reasons[0] and "the update of client(s) [2]" in reasons[1]


@pytest.mark.filterwarnings("ignore:divide by zero", "ignore:invalid value")  # SecAgg+ divides by the weights
def test_a_round_where_nobody_trained_keeps_the_global_adapter(task_identity):
    replies = secure_round(SecureGrid({c: 0.0 for c in range(3)}, {c: 0.1 for c in range(3)}), 3)
    assert [r.weight for _, r in replies.results] == [0.0, 0.0, 0.0]
    assert all(torch.equal(r.state[name], global_state()[name]) for _, r in replies.results for name in r.state)


def test_a_round_with_fewer_weighted_updates_than_the_minimum_aggregates_nothing(task_identity):
    """With two updates in the sum each client would read the other's from the new global adapter."""
    weights, shift = {0: 4.0, 1: 4.0, 2: 0.0, 3: 4.0}, {0: 0.01, 1: 0.02, 2: 0.0, 3: 0.9}
    replies = secure_round(SecureGrid(weights, shift, silent={103}), 4)  # client 3 drops out, client 2 trained nothing
    assert replies.results == []
    reasons = {entry["client"]: entry["reason"] for entry in replies.rejected}
    assert sorted(reasons) == [0, 1, 2, 3]
    assert all("fewer than server.secaggplus.min_contributors (3)" in reasons[client] for client in (0, 1, 2))
