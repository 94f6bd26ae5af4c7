"""What each message between the ServerApp and a ClientApp carries: written down once, here.

Both apps use these types; the apps only wrap them into Flower records
(``ArrayRecord``, ``ConfigRecord``, ``MetricRecord``) and back.

======================  =========================================  =========================================
message type            server -> client                           client -> server (reply)
======================  =========================================  =========================================
``train``               ``arrays``: phi_g; ``config``:             ``arrays``: the client's phi_g;
(Stage 1)               :class:`Instruction`                       ``metrics``: :class:`TrainReply`
``train.personalize``   ``arrays``: phi_g (frozen); ``config``:    ``metrics``: :class:`PersonalizeReply`
(Stage 2)               :class:`Instruction` (``evaluate``: also   (with an :class:`Evaluation` when asked)
                        evaluate in the same message)
``evaluate``            ``arrays``: phi_g; ``config``:             ``metrics``: :class:`EvaluateReply`
(PM evaluation)         :class:`Instruction`
``query``               ``config``: :class:`Instruction`           ``metrics``: :class:`Identity`
======================  =========================================  =========================================

A Stage-1 round with ``secagg.enabled`` runs Flower's SecAgg+ instead: four
``train`` exchanges whose ``secaggplus_configs`` record carries the protocol's
keys and shares. In the third, the server sends Flower's legacy content
(``fitins.parameters``: phi_g as the list :func:`ordered` makes, in the order
of the instruction's ``secagg_names``; ``fitins.config``: the
:class:`Instruction`), and the client replies its *update* phi_g^k - phi_g,
masked (no ArrayRecord), weighted by :func:`secagg_weight`, with its
:class:`TrainReply` metrics in the clear (``fitres.metrics``).

A reply never carries phi_k, a method's other private tensors, or anything per
sample: an evaluation is per-class counts (correct predictions of the
personalized model, of phi_g and of zero-shot, and the number of test samples
of each class) and scalars. A ClientApp that meets a :class:`~fedpurel_app.errors.UserError`
replies with an error of code :data:`USER_ERROR` whose reason is the error's message.

Every ``read_*`` function checks a received record and raises
:class:`ProtocolError` saying what is wrong with it.

Pure library code: no Flower, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TRAIN = "train"
PERSONALIZE = "train.personalize"
EVALUATE = "evaluate"
QUERY = "query"

ARRAYS = "arrays"  # the record of phi_g
CONFIG = "config"  # the record of the Instruction
METRICS = "metrics"  # the record of a reply

USER_ERROR = 100  # Error code of a reply whose ClientApp stopped on a user error
# The clipping norm of a DP run in a train message's config: the key Flower's fixedclipping_mod reads.
CLIPPING_NORM = "clipping_norm"

# A SecAgg+ round's instruction: the order of phi_g's tensors in the legacy list, and the range in
# which SecAgg+ quantizes every value of an update.
SECAGG_NAMES = "secagg-names"
SECAGG_RANGE = "secagg-range"

# Stage-1 statistics a train reply may carry (means over the client's steps).
TRAIN_STATS = ("steps", "task-loss", "align-loss", "conflict-rate", "mean-cosine")


class ProtocolError(ValueError):
    """A received record that does not follow this protocol; the message says how."""


def _int(metrics: Mapping[str, Any], key: str, low: int = 0, high: float = math.inf) -> int:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"[{low}, {high}]" if high != math.inf else f">= {low}"
        raise ProtocolError(f"'{key}' is {value!r}, expected a whole number {bound}")
    return value


def _number(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"'{key}' is {value!r}, expected a finite number")
    return float(value)


def _only(metrics: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(metrics) - allowed)
    if extra:
        raise ProtocolError(f"unexpected metrics {extra}")


# ------------------------------------------------------------------------------ server -> client


@dataclass(frozen=True)
class Instruction:
    """The ``config`` record of every message.

    ``run`` names the server's run (its run folder): a node without a ``state-dir`` keeps
    its private state in a folder of this run, so that a resumed run finds it again.
    ``class_counts``: the global long-tailed train counts, for methods that need the prior.
    ``evaluate``: a personalization message also evaluates the personalized model.
    ``clipping_norm``: a DP run's Stage-1 message: the client clips its update to this norm.
    ``secagg_names`` / ``secagg_range``: a SecAgg+ round's message (see the module's docstring).
    """

    server_round: int
    run: str = ""
    class_counts: tuple[int, ...] | None = None
    evaluate: bool = False
    clipping_norm: float | None = None
    secagg_names: tuple[str, ...] | None = None
    secagg_range: float | None = None

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"server-round": self.server_round, "run": self.run}
        if self.class_counts is not None:
            config["class-counts"] = [int(c) for c in self.class_counts]
        if self.evaluate:
            config["evaluate"] = True
        if self.clipping_norm is not None:
            config[CLIPPING_NORM] = float(self.clipping_norm)
        if self.secagg_names is not None:  # the two come together (``read`` refuses one alone)
            config[SECAGG_NAMES] = list(self.secagg_names)
            config[SECAGG_RANGE] = float(self.secagg_range)
        return config

    @classmethod
    def read(cls, config: Mapping[str, Any]) -> Instruction:
        _only(config, {"server-round", "run", "class-counts", "evaluate", CLIPPING_NORM, SECAGG_NAMES, SECAGG_RANGE})
        clipping = _positive(config, CLIPPING_NORM)
        names = config.get(SECAGG_NAMES)
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise ProtocolError(f"'{SECAGG_NAMES}' is {names!r}, expected a list of tensor names")
        secagg_range = _positive(config, SECAGG_RANGE)
        if (names is None) != (secagg_range is None):
            raise ProtocolError(f"'{SECAGG_NAMES}' and '{SECAGG_RANGE}' come together")
        counts = config.get("class-counts")
        if counts is not None and (
            not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts)
        ):
            raise ProtocolError(f"'class-counts' is {counts!r}, expected a list of whole numbers >= 0")
        run = config.get("run", "")
        if not isinstance(run, str):
            raise ProtocolError(f"'run' is {run!r}, expected a string")
        return cls(
            _int(config, "server-round"),
            run,
            None if counts is None else tuple(counts),
            bool(config.get("evaluate", False)),
            clipping,
            None if names is None else tuple(names),
            secagg_range,
        )


def _positive(config: Mapping[str, Any], key: str) -> float | None:
    """An optional finite float > 0."""
    value = config.get(key)
    if value is not None and (not isinstance(value, float) or not math.isfinite(value) or value <= 0):
        raise ProtocolError(f"'{key}' is {value!r}, expected a finite number > 0")
    return value


def ordered(tensors: Mapping[str, Any], names: tuple[str, ...]) -> list[Any]:
    """phi_g (or an update) as SecAgg+'s unnamed list, in the order of ``names``."""
    if sorted(tensors) != sorted(names):
        raise ProtocolError(f"tensors {sorted(tensors)} are not the instruction's {sorted(names)}")
    return [tensors[name] for name in names]


def named(arrays: list[Any], names: tuple[str, ...]) -> dict[str, Any]:
    """SecAgg+'s unnamed list back into named tensors (the inverse of :func:`ordered`)."""
    if len(arrays) != len(names):
        raise ProtocolError(f"{len(arrays)} arrays for the {len(names)} tensors {list(names)}")
    return dict(zip(names, arrays, strict=True))


def secagg_weight(instruction: Instruction, num_examples: int) -> int:
    """A client's weight in SecAgg+'s weighted mean: its train-set size n_k (FedAvg), or 1 in a DP
    run, whose release is the uniform mean of the clipped updates (docs/METHOD.md "Privacy")."""
    return 1 if instruction.clipping_norm is not None else int(num_examples)


def update_problem(update: Mapping[str, np.ndarray], secagg_range: float) -> str | None:
    """Why a client must not send ``update`` into SecAgg+ (the server cannot check a masked update:
    SecAgg+ would clip a value beyond the range silently, and a NaN corrupts the sum), or None."""
    for name, values in update.items():
        values = np.asarray(values)
        if not np.isfinite(values).all():
            return f"its update of '{name}' is not finite"
        largest = float(np.abs(values).max()) if values.size else 0.0
        if largest > secagg_range:
            return (
                f"its update of '{name}' holds {largest:.4g}, beyond SecAgg+'s range +-{secagg_range:g}: "
                "raise secagg.clipping-range (or lower the learning rate)"
            )
    return None


# ------------------------------------------------------------------------------ client -> server


@dataclass(frozen=True)
class Identity:
    """Reply to ``query``: which partition the node holds (so that the server samples in order)."""

    partition_id: int

    def to_metrics(self) -> dict[str, Any]:
        return {"partition-id": self.partition_id}

    @classmethod
    def read(cls, metrics: Mapping[str, Any]) -> Identity:
        _only(metrics, {"partition-id"})
        return cls(_int(metrics, "partition-id"))


@dataclass(frozen=True)
class TrainReply:
    """Stage-1 reply metrics; its ``arrays`` are the client's phi_g (see :func:`check_phi_g`)."""

    num_examples: int
    partition_id: int
    stats: Mapping[str, float] = field(default_factory=dict)

    def to_metrics(self) -> dict[str, Any]:
        return {"num-examples": self.num_examples, "partition-id": self.partition_id, **self.stats}

    @classmethod
    def read(cls, metrics: Mapping[str, Any], max_examples: int) -> TrainReply:
        _only(metrics, {"num-examples", "partition-id", *TRAIN_STATS})
        stats = {key: _number(metrics, key) for key in TRAIN_STATS if key in metrics}
        return cls(_int(metrics, "num-examples", 1, max_examples), _int(metrics, "partition-id"), stats)


@dataclass(frozen=True)
class Evaluation:
    """A client's test set, per class: correct predictions of the personalized model, of phi_g
    and of zero-shot, and the number of samples; ``personalized``: the client holds private
    parameters (else its personalized model is phi_g)."""

    personalized: bool
    pm_correct: tuple[int, ...]
    gm_correct: tuple[int, ...]
    zs_correct: tuple[int, ...]
    class_total: tuple[int, ...]

    KEYS = ("pm-correct", "gm-correct", "zs-correct", "class-total")

    def to_metrics(self) -> dict[str, Any]:
        values = (self.pm_correct, self.gm_correct, self.zs_correct, self.class_total)
        return {"personalized": int(self.personalized), **{k: list(v) for k, v in zip(self.KEYS, values, strict=True)}}

    @classmethod
    def read(cls, metrics: Mapping[str, Any], num_classes: int) -> Evaluation:
        personalized = metrics.get("personalized")
        if personalized not in (0, 1) or isinstance(personalized, bool):
            raise ProtocolError(f"'personalized' is {personalized!r}, expected 0 or 1")
        rows = []
        for key in cls.KEYS:
            values = metrics.get(key)
            if not isinstance(values, list) or len(values) != num_classes:
                raise ProtocolError(f"'{key}' is not a list of {num_classes} per-class counts")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise ProtocolError(f"'{key}' holds values that are not whole numbers >= 0")
            rows.append(tuple(values))
        total = rows[-1]
        if any(c > t for row in rows[:-1] for c, t in zip(row, total, strict=True)):
            raise ProtocolError("a class has more correct predictions than test samples")
        return cls(bool(personalized), *rows)

    @property
    def num_examples(self) -> int:
        return sum(self.class_total)


@dataclass(frozen=True)
class EvaluateReply:
    """Reply to ``evaluate``: the client's :class:`Evaluation`; ``restored``: it loaded its
    private state from its state folder in this message."""

    partition_id: int
    evaluation: Evaluation
    restored: bool = False

    def to_metrics(self) -> dict[str, Any]:
        return {
            "num-examples": self.evaluation.num_examples,
            "partition-id": self.partition_id,
            "restored": int(self.restored),
            **self.evaluation.to_metrics(),
        }

    @classmethod
    def read(cls, metrics: Mapping[str, Any], num_classes: int) -> EvaluateReply:
        _only(metrics, {"num-examples", "partition-id", "restored", "personalized", *Evaluation.KEYS})
        evaluation = Evaluation.read(metrics, num_classes)
        if _int(metrics, "num-examples") != evaluation.num_examples:
            raise ProtocolError("'num-examples' differs from the sum of 'class-total'")
        return cls(_int(metrics, "partition-id"), evaluation, bool(_int(metrics, "restored", 0, 1)))


@dataclass(frozen=True)
class PersonalizeReply:
    """Reply to ``train.personalize``: the mean loss of the personalization, ``restored`` as in
    :class:`EvaluateReply`, and the :class:`Evaluation` when the message asked for it."""

    num_examples: int
    partition_id: int
    loss: float
    restored: bool = False
    evaluation: Evaluation | None = None

    def to_metrics(self) -> dict[str, Any]:
        metrics = {
            "num-examples": self.num_examples,
            "partition-id": self.partition_id,
            "personal-loss": self.loss,
            "restored": int(self.restored),
        }
        if self.evaluation is not None:
            metrics.update(self.evaluation.to_metrics())
        return metrics

    @classmethod
    def read(cls, metrics: Mapping[str, Any], num_classes: int, evaluated: bool) -> PersonalizeReply:
        keys = {"num-examples", "partition-id", "personal-loss", "restored"}
        _only(metrics, keys | ({"personalized", *Evaluation.KEYS} if evaluated else set()))
        evaluation = Evaluation.read(metrics, num_classes) if evaluated else None
        return cls(
            _int(metrics, "num-examples", 1),
            _int(metrics, "partition-id"),
            _number(metrics, "personal-loss"),
            bool(_int(metrics, "restored", 0, 1)),
            evaluation,
        )


def check_phi_g(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """A train reply's arrays are exactly phi_g: its keys (no extra tensor, e.g. of phi_k), its
    shapes, float32 and finite values; raises :class:`ProtocolError` otherwise."""
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise ProtocolError(f"arrays are not exactly phi_g: missing {missing}, extra {extra}")
    for key, array in arrays.items():
        if tuple(array.shape) != tuple(shapes[key]):
            raise ProtocolError(f"phi_g['{key}'] has shape {tuple(array.shape)}, expected {tuple(shapes[key])}")
        if array.dtype != np.float32:
            raise ProtocolError(f"phi_g['{key}'] has dtype {array.dtype}, expected float32")
        if not np.isfinite(array).all():
            raise ProtocolError(f"phi_g['{key}'] contains NaN or Inf")


__all__ = [
    "ARRAYS",
    "CONFIG",
    "EVALUATE",
    "METRICS",
    "PERSONALIZE",
    "QUERY",
    "TRAIN",
    "USER_ERROR",
    "EvaluateReply",
    "Evaluation",
    "Identity",
    "Instruction",
    "PersonalizeReply",
    "ProtocolError",
    "TrainReply",
    "check_phi_g",
]
