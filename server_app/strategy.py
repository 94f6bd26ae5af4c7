"""The FedAvg subclass that sends and aggregates only the global PEFT parameters phi_g.

- Sampling is seeded (reproducible for a seed and a set of nodes): all nodes
  in round 1 when ``train.all-clients-first-round`` is set, then
  ``train.fraction`` of them (docs/METHOD.md "Stage 1", step 7).
- Aggregation is FedAvg weighted by each client's train-set size n_k, over
  phi_g only. Every reply of every exchange is checked against the protocol
  (:mod:`fedpurel_app.protocol`) first: one that does not follow it (for
  instance one that also carries a private phi_k tensor, or per-sample data)
  is dropped and logged, and so is an error reply.
- Messages are built from an :class:`~fedpurel_app.protocol.Instruction`;
  personalization and evaluation messages carry phi_g out and bring metrics
  back, never parameters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpurel_app import protocol
from fedpurel_app.config import DpConfig
from fedpurel_app.errors import ClientError
from fedpurel_app.privacy import private_mean, update_norm
from fedpurel_app.protocol import Identity, Instruction, ProtocolError, TrainReply

from .cluster import dependency_error, from_ray_worker

R = TypeVar("R")


class FedPuReLStrategy(FedAvg):
    """FedAvg over phi_g with seeded sampling, checked replies and a personalization phase."""

    def __init__(
        self,
        phi_g_shapes: dict[str, tuple[int, ...]],
        fraction_train: float = 0.4,
        all_clients_first_round: bool = True,
        min_available_nodes: int = 2,
        seed: int = 0,
        max_examples: int = 10**9,
        min_valid_replies: int = 1,
        num_classes: int = 1,
        dp: DpConfig | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=min_available_nodes,
        )
        self.phi_g_shapes = dict(phi_g_shapes)
        self.all_clients_first_round = all_clients_first_round
        self.seed = seed
        self.max_examples = max_examples
        self.min_valid_replies = min_valid_replies
        self.num_classes = num_classes
        #: Client-level DP of the Stage-1 updates (None: off); its noise multiplier may be set later.
        self.dp = dp
        self.noise_multiplier = dp.noise_multiplier if dp is not None else 0.0
        self.last_sampled: list[int] = []
        self.sent: dict[str, torch.Tensor] = {}
        # node id -> the partition-id it reports. Node ids are random per simulation run;
        # ordering nodes by partition makes sampling and aggregation reproducible.
        self.partitions: dict[int, int] = {}

    # --- nodes and sampling ----------------------------------------------------------------

    def note_partitions(self, replies: Iterable[Message]) -> None:
        """Remember the ``partition-id`` each replying node reports in its metrics."""
        for msg in replies:
            if msg.has_error():
                continue
            for record in msg.content.metric_records.values():
                pid = record.get("partition-id")
                if isinstance(pid, int) and not isinstance(pid, bool):
                    self.partitions[msg.metadata.src_node_id] = pid

    def _order(self, node_id: int) -> tuple[float, int]:
        """Sort key: by reported partition, then (nodes that never replied) by node id."""
        return (self.partitions.get(node_id, math.inf), node_id)

    def nodes(self, grid: Grid) -> list[int]:
        """All connected nodes, in :meth:`_order`, once at least ``min_available_nodes`` are up."""
        while len(nodes := sorted(grid.get_node_ids(), key=self._order)) < self.min_available_nodes:
            log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), self.min_available_nodes)
            time.sleep(1)
        return nodes

    def sample_size(self, server_round: int, num_nodes: int) -> int:
        """How many of ``num_nodes`` clients round ``server_round`` trains."""
        if server_round == 1 and self.all_clients_first_round:
            return num_nodes
        return min(num_nodes, max(self.min_train_nodes, int(round(num_nodes * self.fraction_train))))

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        nodes = self.nodes(grid)
        size = self.sample_size(server_round, len(nodes))
        if size == len(nodes):
            return nodes
        rng = np.random.default_rng([self.seed, server_round])
        picked = rng.choice(len(nodes), size=size, replace=False)
        return [nodes[i] for i in sorted(picked)]

    # --- messages --------------------------------------------------------------------------

    def messages(
        self, nodes: list[int], message_type: str, instruction: Instruction, arrays: ArrayRecord | None = None
    ) -> list[Message]:
        content: dict[str, Any] = {protocol.CONFIG: ConfigRecord(instruction.to_config())}
        if arrays is not None:
            content[protocol.ARRAYS] = arrays
        return list(self._construct_messages(RecordDict(content), nodes, message_type))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord | Instruction, grid: Grid
    ) -> Iterable[Message]:
        """Stage 1: phi_g and the instruction to the sampled clients."""
        self.sent = arrays.to_torch_state_dict()
        nodes = self.sample_train(server_round, grid)
        return self.messages(nodes, protocol.TRAIN, _instruction(config, server_round), arrays)

    def sample_train(self, server_round: int, grid: Grid) -> list[int]:
        """The clients Stage-1 round ``server_round`` trains (kept as :attr:`last_sampled`)."""
        self.last_sampled = self.sample(server_round, grid)
        return self.last_sampled

    def configure_personalize(
        self, arrays: ArrayRecord, instruction: Instruction, grid: Grid, nodes: list[int] | None = None
    ) -> list[Message]:
        """Stage 2: the frozen phi_g to ``nodes`` (all nodes when None). With ``instruction.evaluate``
        every client also evaluates its personalized model in the same message (one ClientApp
        process start per client instead of two in deployment)."""
        return self.messages(self.nodes(grid) if nodes is None else nodes, protocol.PERSONALIZE, instruction, arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord | Instruction, grid: Grid
    ) -> Iterable[Message]:
        """PM evaluation on every client's own test set."""
        return self.messages(self.nodes(grid), protocol.EVALUATE, _instruction(config, server_round), arrays)

    def configure_query(self, instruction: Instruction, grid: Grid) -> list[Message]:
        """Ask every node which partition it holds (a resumed run's nodes have new ids)."""
        return self.messages(self.nodes(grid), protocol.QUERY, instruction)

    # --- replies ---------------------------------------------------------------------------

    def read_replies(
        self, what: str, replies: Iterable[Message], read: Callable[[Message], R], sent: Iterable[int] = ()
    ) -> list[tuple[Message, R]]:
        """Every reply checked with ``read`` (it reads a reply with :mod:`fedpurel_app.protocol`); error replies,
        replies that do not follow the protocol and nodes of ``sent`` that did not reply are
        logged and left out.

        Raises :class:`~fedpurel_app.errors.ClientError` when no reply is valid and some
        client reported a user error of its own (its message says what to fix), and
        :class:`~server_app.cluster.MissingDependencyError` at once when a Ray worker cannot
        import the app or a dependency (that machine would fail every round).
        """
        replies = list(replies)
        self.note_partitions(replies)
        kept, user_errors = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                missing = dependency_error(reason)
                if missing is not None and from_ray_worker(reason):
                    raise missing
                if missing is not None:
                    reason = str(missing)
                if msg.error.code == protocol.USER_ERROR or missing is not None:
                    user_errors.append(reason)
                log(WARNING, "%s: node %d replied with an error: %s", what, node, reason)
                continue
            try:
                kept.append((msg, read(msg)))
            except ProtocolError as err:
                log(WARNING, "%s: dropped the reply of node %d: %s", what, node, err)
        missing = sorted(set(sent) - {msg.metadata.src_node_id for msg in replies})
        if missing:
            log(WARNING, "%s: no reply from node(s) %s", what, missing)
        if not kept and user_errors:
            raise ClientError(f"{what}: every client that replied stopped on an error of its own: {user_errors[0]}")
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted FedAvg of phi_g over the valid replies; every other reply is dropped and logged.
        With DP: the uniform mean of the (clipped) updates over the sampled clients plus Gaussian
        noise (:func:`fedpurel_app.privacy.private_mean`); an update beyond the clipping norm is dropped.

        Raises RuntimeError when fewer than ``min_valid_replies`` valid replies remain.
        """
        what = f"round {server_round}"
        kept = [msg for msg, _ in self.read_replies(what, replies, self._read_train, self.last_sampled)]
        if self.dp is not None:
            kept = [msg for msg in kept if self._within_clipping_norm(what, msg)]
        if len(kept) < self.min_valid_replies:
            raise RuntimeError(
                f"{what}: only {len(kept)} valid client update(s), "
                f"at least {self.min_valid_replies} needed; see the dropped replies above"
            )
        # Replies arrive in any order; a fixed order makes the floating-point sum, and so the
        # run, reproducible.
        kept.sort(key=lambda msg: self._order(msg.metadata.src_node_id))
        arrays, metrics = super().aggregate_train(server_round, kept)
        if metrics is not None and "partition-id" in metrics:
            del metrics["partition-id"]  # an identity, not a statistic to average
        if self.dp is not None:
            updates = [_phi_g_of(msg) for msg in kept]
            released = private_mean(
                self.sent, updates, len(self.last_sampled), self.noise_multiplier, self.dp.clipping_norm
            )
            arrays = ArrayRecord(released)
        return arrays, metrics

    def _within_clipping_norm(self, what: str, msg: Message) -> bool:
        norm = update_norm(_phi_g_of(msg), self.sent)
        if norm <= self.dp.clipping_norm * (1 + 1e-5) + 1e-9:
            return True
        log(
            WARNING,
            "%s: dropped the update of node %d: its norm %.6g exceeds the clipping norm %g",
            what,
            msg.metadata.src_node_id,
            norm,
            self.dp.clipping_norm,
        )
        return False

    def _read_train(self, msg: Message) -> TrainReply:
        """A Stage-1 reply: exactly one ArrayRecord that is exactly phi_g, and its metrics."""
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            raise ProtocolError(f"expected one ArrayRecord (phi_g), got {len(records)}")
        protocol.check_phi_g({k: v.numpy() for k, v in records[0].items()}, self.phi_g_shapes)
        return TrainReply.read(metrics_of(msg), self.max_examples)

    def reply_problem(self, msg: Message) -> str | None:
        """Why a Stage-1 reply must not be aggregated, or None when it is a valid phi_g update."""
        if msg.has_error():
            return f"error reply: {msg.error.reason}"
        try:
            self._read_train(msg)
        except ProtocolError as err:
            return str(err)
        return None

    def identities(self, replies: Iterable[Message]) -> list[Identity]:
        return [reply for _, reply in self.read_replies("query", replies, lambda m: Identity.read(metrics_of(m)))]


def _instruction(config: ConfigRecord | Instruction, server_round: int) -> Instruction:
    if isinstance(config, Instruction):
        return config
    return Instruction(server_round)


def _phi_g_of(msg: Message) -> dict[str, torch.Tensor]:
    return next(iter(msg.content.array_records.values())).to_torch_state_dict()


def metrics_of(msg: Message) -> dict[str, Any]:
    """The one MetricRecord of a reply; a reply other than Stage 1's must carry no arrays."""
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        raise ProtocolError(f"expected one MetricRecord, got {len(records)}")
    if msg.content.array_records and msg.metadata.message_type != protocol.TRAIN:
        raise ProtocolError("a reply other than Stage 1's carries arrays")
    return dict(records[0])
