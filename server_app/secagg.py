"""A Stage-1 round through Flower's SecAgg+ (``secagg.enabled``): the server only holds the sum.

Flower 1.41's ``SecAggPlusWorkflow`` exists for the legacy API only: it wants a
``LegacyContext`` (phi_g and the round in its state) and a legacy ``Strategy``
whose ``configure_fit`` names the clients and whose ``aggregate_fit`` receives
the unmasked aggregate in place of every result's parameters. :func:`secure_round`
gives it both around our round: :class:`_Stage1` hands the nodes the round's
:class:`~fedpurel_app.protocol.Instruction` (with the tensor order and the
quantization range) and keeps the clients' metrics; the workflow talks to the
nodes through :class:`ExchangeGrid`, our polling exchange, which also counts
what the server receives. The clients send their update phi_g^k - phi_g
(``client_app/secagg.py``), so the released phi_g is phi_g plus the workflow's
weighted mean of the updates; in a DP run the clients weigh 1 and clip, and the
noise is added to the sum (:func:`fedpurel_app.privacy.noised_release`).

Every server-side check of an individual update is gone with the masking (the
clients check their own, :func:`fedpurel_app.protocol.update_problem`);
docs/RELIABILITY.md "Secure aggregation" says what else SecAgg+ does not give.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedpurel_app import protocol
from fedpurel_app.config import SecAggConfig
from fedpurel_app.errors import ClientError, ConfigError
from fedpurel_app.privacy import noised_release
from fedpurel_app.protocol import Instruction, ProtocolError, TrainReply

MODULUS_RANGE = 1 << 32  # SecAggPlusWorkflow's default: the masked sums wrap around 2^32

Tensors = dict[str, torch.Tensor]


class ExchangeGrid:
    """The grid the workflow talks to: its ``send_and_receive`` is ours (``exchange``: pushes, polls
    every 10 ms, counts the bytes), and every reply is kept, so that the caller can count what the
    server received."""

    def __init__(self, grid: Grid, exchange: Callable[[list[Message]], list[Message]]) -> None:
        self.grid, self.exchange = grid, exchange
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = self.exchange(list(messages))
        self.replies += replies
        return replies


class _Stage1(Strategy):
    """The legacy strategy the workflow drives: our nodes and instruction in, the aggregate and the
    contributors' metrics out."""

    def __init__(self, grid: Grid, nodes: list[int], instruction: Instruction, max_examples: int) -> None:
        self.grid, self.nodes, self.instruction, self.max_examples = grid, nodes, instruction, max_examples
        self.contributors: list[int] = []  # the nodes whose updates are in the aggregate
        self.results: list[tuple[int, TrainReply]] = []  # (node, its metrics) of the contributors
        self.aggregate: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        config = self.instruction.to_config()
        return [(GridClientProxy(node, self.grid, 0), FitIns(parameters, config)) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # The workflow has put its unmasked aggregate in every result: no individual update.
        for proxy, fitres in results:
            self.contributors.append(proxy.node_id)
            try:
                self.results.append((proxy.node_id, TrainReply.read(fitres.metrics, self.max_examples)))
            except ProtocolError as err:  # its update is in the sum already; its metrics are left out
                log(WARNING, "round %d: node %d's metrics left out: %s", server_round, proxy.node_id, err)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass
class SecureRound:
    """What a SecAgg+ round gives the server: the released phi_g, the contributors' metrics
    (means weighted by ``num-examples``, as FedAvg's), and what the server received."""

    phi_g: Tensors
    metrics: dict
    contributors: list[int]
    replies: int
    arrays_received: int

    def train_metrics(self) -> dict:
        """The round's ``train`` entry of results.json (and the trackers' ``train/*``)."""
        return {
            **self.metrics,
            "secagg-contributors": len(self.contributors),
            "secagg-replies": self.replies,
            "secagg-arrays-received": self.arrays_received,
        }


def check_sample_size(sampled: int) -> None:
    """SecAgg+ needs at least 2 clients in a round (its workflow halts with fewer)."""
    if sampled < 2:
        raise ConfigError(
            f"secagg.enabled: a Stage-1 round samples {sampled} client(s), SecAgg+ needs at least 2: "
            "raise train.fraction or run more clients"
        )


def secure_round(
    grid: Grid,
    exchange: Callable[[list[Message]], list[Message]],
    nodes: list[int],
    phi_g: Tensors,
    instruction: Instruction,
    cfg: SecAggConfig,
    max_examples: int,
    timeout: float,
    noise_multiplier: float = 0.0,
) -> SecureRound:
    """One Stage-1 round of ``nodes`` aggregated by SecAgg+.

    Without DP (``instruction.clipping_norm`` None) the release is phi_g + sum(n_k u_k) / sum(n_k)
    over the contributors, quantized in ``[-cfg.clipping_range, cfg.clipping_range]``; with DP it is
    phi_g + (r * mean(u_k) + N(0, (z C)^2)) / m, r contributors of m sampled, each u_k clipped to C,
    quantized in ``[-C, C]`` (no coordinate of a clipped update exceeds its norm).

    Raises :class:`ConfigError` when fewer than 2 clients are sampled (SecAgg+ needs 2),
    :class:`ClientError` when the round halted and a client reported an error of its own, and
    RuntimeError when it halted otherwise (too few clients left for the reconstruction threshold).
    """
    what = f"round {instruction.server_round}"
    check_sample_size(len(nodes))
    dp = instruction.clipping_norm is not None
    names = tuple(phi_g)
    secagg_range = float(instruction.clipping_norm) if dp else cfg.clipping_range
    instruction = dataclasses.replace(instruction, secagg_names=names, secagg_range=secagg_range)
    proxy = ExchangeGrid(grid, exchange)
    strategy = _Stage1(proxy, nodes, instruction, max_examples)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    sent = ndarrays_to_parameters(protocol.ordered({k: v.numpy() for k, v in phi_g.items()}, names))
    context.state[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(sent, True)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: instruction.server_round})
    workflow = SecAggPlusWorkflow(
        num_shares=float(cfg.shares),
        reconstruction_threshold=float(cfg.threshold),
        max_weight=1.0 if dp else float(max_examples),
        clipping_range=secagg_range,
        quantization_range=cfg.quantization_range,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow(proxy, LegacyContext(context, strategy=strategy, client_manager=SimpleClientManager()))
    if strategy.aggregate is None:
        _halted(what, proxy.replies, len(nodes))
    mean = protocol.named(strategy.aggregate, names)
    if dp:
        total = {k: torch.from_numpy(np.asarray(mean[k], dtype=np.float64)) * len(strategy.contributors) for k in names}
        released = noised_release(phi_g, total, len(nodes), noise_multiplier, float(instruction.clipping_norm))
    else:
        released = {k: (phi_g[k].double() + torch.from_numpy(np.asarray(mean[k]))).to(phi_g[k].dtype) for k in names}
    return SecureRound(
        released,
        _metrics(strategy.results),
        sorted(strategy.contributors),
        len(proxy.replies),
        sum(len(r) for msg in proxy.replies if not msg.has_error() for r in msg.content.array_records.values()),
    )


def quantization_bound(secagg_range: float, weights: list[int], max_weight: float, levels: int) -> float:
    """The largest error per value of SecAgg+'s weighted mean against the exact one.

    Each client sends q(w_k / W * u_k), q rounding stochastically to a grid of step
    s = 2 r / (L - 1) or finer on [-r, r] (r the range, L the levels, W the max weight), so each
    term errs by less than s; the sum is divided by sum_k round(L w_k / W) / L, the weights as
    SecAgg+ rounds them. Bound: K s / sum_k (round(L w_k / W) / L), for K clients (up to the
    difference between the rounded and the exact weights, of order 1 / L)."""
    step = 2 * secagg_range / (levels - 1)
    ratios = [round(w / max_weight * levels) / levels for w in weights]
    return len(weights) * step / sum(ratios)


def _metrics(results: list[tuple[int, TrainReply]]) -> dict:
    """The contributors' Stage-1 statistics, weighted by their ``num-examples`` as FedAvg's metrics are."""
    if not results:
        return {}
    ordered = sorted(results, key=lambda pair: pair[1].partition_id)  # a fixed order of the float sums
    records = [RecordDict({protocol.METRICS: MetricRecord(reply.to_metrics())}) for _, reply in ordered]
    metrics = dict(aggregate_metricrecords(records, "num-examples"))
    metrics.pop("partition-id", None)  # an identity, not a statistic to average
    return metrics


def _halted(what: str, replies: list[Message], sampled: int) -> None:
    errors = [msg.error for msg in replies if msg.has_error()]
    own = [e.reason for e in errors if e.code == protocol.USER_ERROR]
    if own:
        raise ClientError(f"{what}: secure aggregation halted; a client stopped on an error of its own: {own[0]}")
    reasons = "; ".join(sorted({e.reason or f"error code {e.code}" for e in errors})[:3])
    raise RuntimeError(
        f"{what}: secure aggregation halted with {sampled} sampled clients (too few replied for the "
        f"reconstruction threshold secagg.threshold){': ' + reasons if reasons else ''}"
    )
