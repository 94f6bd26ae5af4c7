"""The FedAvg subclass that sends and aggregates only the global PEFT parameters phi_g.

- Sampling is seeded (reproducible for a seed and a set of nodes): all nodes
  in round 1 when ``all-clients-first-round`` is set, then ``fraction-train``
  of them (METHOD.md "Stage 1", step 7).
- Aggregation is FedAvg weighted by each client's train-set size n_k, over
  phi_g only. Every reply is checked first (:meth:`reply_problem`): one that is
  not exactly a finite float32 phi_g with a sane example count (for instance
  one that also carries a private phi_k tensor) is dropped and logged.
- Stage 2 messages (``train.personalize``) and PM evaluation carry phi_g out
  and bring metrics back, never parameters.
"""

from __future__ import annotations

import math

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

PERSONALIZE = f"{MessageType.TRAIN}.personalize"


class FedPuReLStrategy(FedAvg):
    """FedAvg over phi_g with seeded sampling and a personalization phase."""

    def __init__(
        self,
        phi_g_shapes: dict[str, tuple[int, ...]],
        fraction_train: float = 0.4,
        all_clients_first_round: bool = True,
        min_available_nodes: int = 2,
        seed: int = 0,
        max_examples: int = 10**9,
        min_valid_replies: int = 1,
        num_classes: int | None = None,
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
        self.last_sampled: list[int] = []
        # node id -> the partition-id it reports. Node ids are random per simulation run;
        # ordering nodes by partition makes sampling and aggregation reproducible.
        self.partitions: dict[int, int] = {}

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

    def _nodes(self, grid: Grid) -> list[int]:
        """All connected nodes, in :meth:`_order`, once at least ``min_available_nodes`` are up."""
        import time

        while len(nodes := sorted(grid.get_node_ids(), key=self._order)) < self.min_available_nodes:
            log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), self.min_available_nodes)
            time.sleep(1)
        return nodes

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        nodes = self._nodes(grid)
        if server_round == 1 and self.all_clients_first_round:
            return nodes
        size = max(self.min_train_nodes, int(round(len(nodes) * self.fraction_train)))
        rng = np.random.default_rng([self.seed, server_round])
        picked = rng.choice(len(nodes), size=min(size, len(nodes)), replace=False)
        return [nodes[i] for i in sorted(picked)]

    def _messages(
        self, nodes: list[int], arrays: ArrayRecord, server_round: int, message_type: str,
        config: ConfigRecord | None = None,
    ) -> list[Message]:
        content = ConfigRecord({**(config or {}), "server-round": server_round})
        record = RecordDict({"arrays": arrays, "config": content})
        return list(self._construct_messages(record, nodes, message_type))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Stage 1: send phi_g (and ``config``, e.g. the class counts) to the sampled clients."""
        self.last_sampled = self.sample(server_round, grid)
        return self._messages(self.last_sampled, arrays, server_round, MessageType.TRAIN, config)

    def configure_personalize(
        self, server_round: int, arrays: ArrayRecord, grid: Grid, nodes: list[int] | None = None,
        evaluate: bool = False,
    ) -> list[Message]:
        """Stage 2: send the frozen phi_g to ``nodes`` (all nodes when None).

        With ``evaluate`` every client also evaluates its personalized model right after
        training and replies with the evaluation metrics (see :meth:`evaluate_replies`):
        one message per client instead of two, which saves a ClientApp process start per
        client in deployment.
        """
        config = ConfigRecord({"evaluate": 1}) if evaluate else None
        return self._messages(
            self._nodes(grid) if nodes is None else nodes, arrays, server_round, PERSONALIZE, config
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """PM evaluation on every client's own test set."""
        return self._messages(self._nodes(grid), arrays, server_round, MessageType.EVALUATE)

    def reply_problem(self, msg: Message) -> str | None:
        """Why a Stage-1 reply must not be aggregated, or None when it is a valid phi_g update.

        Checked: exactly one ArrayRecord holding exactly phi_g's keys (an extra array,
        e.g. a private phi_k tensor, is refused), shapes, float32 dtype, finite
        values, and a whole positive ``num-examples`` no larger than ``max_examples``.
        """
        if msg.has_error():
            return f"error reply: {msg.error.reason}"
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            return f"expected one ArrayRecord (phi_g), got {len(records)}"
        arrays = records[0]
        missing = sorted(set(self.phi_g_shapes) - set(arrays))
        extra = sorted(set(arrays) - set(self.phi_g_shapes))
        if missing or extra:
            return f"arrays are not exactly phi_g: missing {missing}, extra {extra}"
        for key, array in arrays.items():
            if tuple(array.shape) != self.phi_g_shapes[key]:
                return f"phi_g['{key}'] has shape {tuple(array.shape)}, expected {self.phi_g_shapes[key]}"
            if array.dtype != "float32":
                return f"phi_g['{key}'] has dtype {array.dtype}, expected float32"
            if not np.isfinite(array.numpy()).all():
                return f"phi_g['{key}'] contains NaN or Inf"
        metrics = list(msg.content.metric_records.values())
        count = metrics[0].get(self.weighted_by_key) if len(metrics) == 1 else None
        if (
            not isinstance(count, (int, float))
            or not np.isfinite(count)  # int(inf) would raise: a poisoned count must not crash the round
            or count != int(count)
            or not 0 < count <= self.max_examples
        ):
            return f"'{self.weighted_by_key}' is {count!r}, expected a whole number in [1, {self.max_examples}]"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted FedAvg of phi_g over the valid replies; every other reply is dropped and logged.

        Raises RuntimeError when fewer than ``min_valid_replies`` valid replies remain.
        """
        replies = list(replies)
        self.note_partitions(replies)
        kept = []
        for msg in replies:
            problem = self.reply_problem(msg)
            if problem is None:
                kept.append(msg)
            else:
                log(WARNING, "Round %d: dropped the reply of node %d: %s",
                    server_round, msg.metadata.src_node_id, problem)
        missing = sorted(set(self.last_sampled) - {msg.metadata.src_node_id for msg in kept})
        if missing:
            log(WARNING, "Round %d: no valid update from sampled node(s) %s", server_round, missing)
        if len(kept) < self.min_valid_replies:
            raise RuntimeError(
                f"round {server_round}: only {len(kept)} valid client update(s), "
                f"at least {self.min_valid_replies} needed; see the dropped replies above"
            )
        # Replies arrive in any order; a fixed order makes the floating-point sum, and so the
        # run, reproducible.
        kept.sort(key=lambda msg: self._order(msg.metadata.src_node_id))
        arrays, metrics = super().aggregate_train(server_round, kept)
        if metrics is not None and "partition-id" in metrics:
            del metrics["partition-id"]  # an identity, not a statistic to average
        return arrays, metrics

    def evaluate_problem(self, msg: Message) -> str | None:
        """Why an evaluation reply must not be pooled, or None when it is well-formed.

        Checked: one MetricRecord with ``labels``, ``pm-preds``, ``gm-preds`` and
        ``zs-preds`` as lists of the same length ``num-examples``, class indices in
        ``[0, num_classes)``, and ``personalized`` 0 or 1.
        """
        records = list(msg.content.metric_records.values())
        if len(records) != 1:
            return f"expected one MetricRecord, got {len(records)}"
        metrics = records[0]
        keys = ("labels", "pm-preds", "gm-preds", "zs-preds")
        if missing := [k for k in (*keys, "num-examples", "personalized") if k not in metrics]:
            return f"missing metrics {missing}"
        n = metrics["num-examples"]
        high = self.num_classes if self.num_classes is not None else np.iinfo(np.int64).max
        for key in keys:
            values = metrics[key]
            if not isinstance(values, list) or len(values) != n:
                return f"'{key}' is not a list of num-examples ({n!r}) values"
            if not all(isinstance(v, int) and 0 <= v < high for v in values):
                return f"'{key}' holds values that are not class indices in [0, {high})"
        if metrics["personalized"] not in (0, 1):
            return f"'personalized' is {metrics['personalized']!r}, expected 0 or 1"
        return None

    def evaluate_replies(self, replies: Iterable[Message]) -> list[MetricRecord]:
        """The metric records of the successful, well-formed evaluation replies; others are logged."""
        replies = list(replies)
        self.note_partitions(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
        kept = []
        for msg in valid:
            problem = self.evaluate_problem(msg)
            if problem is None:
                kept.append(next(iter(msg.content.metric_records.values())))
            else:
                log(WARNING, "Dropped the evaluation reply of node %d: %s", msg.metadata.src_node_id, problem)
        return kept
