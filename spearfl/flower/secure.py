"""One spearfl round through Flower's SecAgg+ (`flwr.server.workflow.SecAggPlusWorkflow`): the server learns the
weighted mean of the round's updates and nothing of any single one.

SecAgg+ is written for Flower's legacy workflow: it asks a legacy Strategy's `configure_fit` which nodes to train
with what, runs its four stages (keys, key shares, masked vectors, unmasking), and hands `aggregate_fit` one
FitRes per client whose masked vector entered the sum, each carrying the unmasked aggregate. `RoundStrategy`
is that Strategy for a single round: the work orders go out, the contributions come back, nothing else. The
workflow's messages travel through `StageGrid`, which uses the ServerApp's own exchange (one timeout a stage)
and notes where each node dropped out and how many bytes it sent.

`round_replies` turns the outcome into the replies `spearfl.runtime.server.FederatedRun` aggregates: every
contributing client's result carries the aggregate state (global adapter plus the mean update) with its own
weight and clear metrics, so the mean combine reproduces the aggregate and the server step follows unchanged.
A masked contribution cannot be taken out of the sum afterwards, so a contribution whose clear part fails its
checks (a forged nonce, a weight above the prompts asked for, missing metrics) voids the whole round.

Left out on purpose: verifying that a masked vector is well formed (a client running a modified mod can put any
value within the modulus into the sum; SecAgg+ has no range proofs), and a seeded quantization (the mod rounds
stochastically with numpy's global generator, so a rerun agrees within the quantization step, not bit for bit).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from spearfl.algorithms.base import ClientResult
from spearfl.config import MODULUS_RANGE, SecAggPlusConfig
from spearfl.flower.records import InvalidReply, read_aggregate, read_secure_reply

# (messages, timeout in seconds) -> their replies in order, None for a missing one (FlowerClients.exchange)
Exchange = Callable[[list[Message], float], list[Message | None]]


@dataclass(frozen=True)
class NodeProxy:
    """The one thing SecAgg+ reads of a legacy ClientProxy: its node id."""

    node_id: int


class RoundStrategy:
    """The two calls of a legacy Strategy that SecAgg+ makes, for one round: hand out the work, keep the results."""

    def __init__(self, work: dict[int, FitIns]):
        self.work = work  # node id -> its FitIns
        self.results: list[tuple[NodeProxy, FitRes]] | None = None  # None: the protocol stopped before unmasking

    def configure_fit(self, server_round: int, parameters, client_manager) -> list[tuple[NodeProxy, FitIns]]:
        return [(NodeProxy(node), fit_ins) for node, fit_ins in self.work.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[NodeProxy, FitRes]], failures) -> tuple[None, dict]:
        """Keep the contributions (each FitRes's parameters are the unmasked aggregate); spearfl's server step, not
        the workflow, makes the next global adapter."""
        self.results = list(results)
        return None, {}


class StageGrid:
    """The Grid the workflow sends through: the ServerApp's exchange, noting dropouts and each node's bytes."""

    def __init__(self, exchange: Exchange):
        self.exchange = exchange
        self.dropped: dict[int, str] = {}  # node -> where it dropped out
        self.sent_bytes: dict[int, int] = defaultdict(int)  # node -> bytes of every reply it sent

    def send_and_receive(self, messages, *, timeout: float) -> list[Message]:
        messages = list(messages)
        stages = [message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] for message in messages]  # read first
        replies = self.exchange(messages, timeout)
        for message, stage, reply in zip(messages, stages, replies):
            node = message.metadata.dst_node_id
            if reply is None:
                self.dropped.setdefault(node, f"dropped out of secure aggregation: no reply to stage {stage} within {timeout:g} s")
            elif reply.has_error():
                self.dropped.setdefault(node, f"dropped out of secure aggregation: failed at stage {stage}: {reply.error.reason[:500]}")
            else:
                self.sent_bytes[node] += payload_bytes(reply.content)
        return [reply for reply in replies if reply is not None]


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a reply's arrays and byte strings (public keys, encrypted shares, the masked vector), headers aside."""
    arrays = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    values = [value for record in content.config_records.values() for value in record.values()]
    items = [item for value in values for item in (value if isinstance(value, list) else [value])]
    return arrays + sum(len(item) for item in items if isinstance(item, bytes))


@dataclass
class SecureOutcome:
    """A round of SecAgg+: the clear FitRes of each node whose masked update is in the sum (its parameters the
    unmasked aggregate), where the others dropped out, bytes sent, and why the protocol failed, if it did."""

    contributions: dict[int, FitRes]
    dropped: dict[int, str]
    sent_bytes: dict[int, int]
    failure: str = ""


def run_secure_round(
    exchange: Exchange, work: dict[int, FitIns], round_index: int, settings: SecAggPlusConfig, max_weight: float, timeout: float
) -> SecureOutcome:
    """Run SecAgg+ over the nodes in `work` (node id -> FitIns); `max_weight`: the largest weight a client may fold in."""
    strategy, grid = RoundStrategy(work), StageGrid(exchange)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the adapter travels in each FitIns
    workflow = SecAggPlusWorkflow(
        settings.num_shares, settings.reconstruction_threshold, max_weight=float(max_weight),
        clipping_range=settings.clipping_range, quantization_range=settings.quantization_range,
        modulus_range=MODULUS_RANGE, timeout=timeout,
    )
    failure = ""
    try:
        workflow(grid, context)
    except (KeyError, TypeError, ValueError, IndexError) as error:  # a reply the protocol could not use
        failure = f"secure aggregation failed: {type(error).__name__}: {str(error)[:300]}"
    if strategy.results is None and not failure:
        failure = (
            "secure aggregation stopped before unmasking: too few clients answered its stages (each needs "
            "reconstruction_threshold of its num_shares neighbours)"
        )
    contributions = {} if strategy.results is None else {proxy.node_id: fit_res for proxy, fit_res in strategy.results}
    return SecureOutcome(contributions, grid.dropped, dict(grid.sent_bytes), failure)


def round_replies(
    outcome: SecureOutcome,
    nodes: dict[int, int],
    global_state: dict[str, torch.Tensor],
    asked: int,
    redeem: Callable[[int, str], None],
    required_metrics: tuple[str, ...],
    settings: SecAggPlusConfig,
) -> tuple[list[tuple[int, ClientResult]], list[dict]]:
    """(accepted results, rejected {"client", "reason"}) of the round's clients that had a node (`nodes`: client ->
    node). `redeem(client, nonce)` closes the client's work order, raising InvalidReply for a wrong nonce."""
    contributed, rejected, voiding = [], [], []
    for client, node in nodes.items():
        if node not in outcome.contributions:
            rejected.append({"client": client, "reason": outcome.dropped.get(node) or outcome.failure or "dropped out of secure aggregation"})
            continue
        try:
            weight, metrics, nonce = read_secure_reply(outcome.contributions[node], asked, required_metrics)
            redeem(client, nonce)
            contributed.append((client, weight, metrics | {"upload_bytes": outcome.sent_bytes.get(node, 0)}))
        except InvalidReply as error:
            voiding.append(client)
            rejected.append({"client": client, "reason": f"{error}; its masked update is inside the round's sum, so the round aggregates nothing"})
    if voiding or outcome.failure:
        why = outcome.failure or f"the round's secure sum holds the update of client(s) {voiding}, whose reply failed its checks"
        return [], rejected + [{"client": client, "reason": why} for client, _, _ in contributed]
    weighted = sum(weight > 0 for _, weight, _ in contributed)
    if 0 < weighted < settings.min_contributors:  # a sum of so few updates gives each away to the others
        why = (f"only {weighted} client(s) contributed a weighted update to the secure sum, fewer than "
               f"server.secaggplus.min_contributors ({settings.min_contributors}): the round aggregates nothing")
        return [], rejected + [{"client": client, "reason": why} for client, _, _ in contributed]
    if weighted == 0:  # nothing was trained: the aggregate is 0 / 0
        return [(client, ClientResult(global_state, 0.0, metrics)) for client, _, metrics in contributed], rejected
    try:
        first = next(iter(outcome.contributions.values()))  # every contribution carries the same aggregate
        expected = {name: tensor.numpy() for name, tensor in global_state.items()}
        update = read_aggregate(first.parameters, expected)
    except InvalidReply as error:
        return [], rejected + [{"client": client, "reason": str(error)} for client, _, _ in contributed]
    state = {name: global_state[name] + torch.from_numpy(update[name]) for name in global_state}
    return [(client, ClientResult(state, weight, metrics)) for client, weight, metrics in contributed], rejected
