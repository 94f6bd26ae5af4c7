"""Fed-LT data protocol (pure numpy, deterministic for a seed).

Protocol (docs/METHOD.md "Fed-LT protocol"):

1. Long-tailed global train set: ``n_c = floor(n_max * IF^(-c/(C-1)))`` images
   of class ``c`` (in the dataset's class order, so class 0 is the head),
   sampled without replacement from the dataset's train pool.
2. Client split: for every class, proportions ~ Dirichlet(alpha * 1_K) split
   that class's LT images across the K clients; the whole draw is repeated
   until every client holds at least ``min_samples`` images.
3. Global test set: the dataset's balanced test set (GM evaluation).
4. Client test set (PM evaluation): drawn from the global test set with the
   client's train label proportions (see :func:`client_test_indices`).

:func:`build_fedlt` runs 1, 2 and 4. It depends only on its arguments: every
Flower client recomputes the same split and keeps its own partition.
Each stage draws from its own random stream, derived from ``seed`` with
``np.random.SeedSequence([seed, stage, ...])``, so e.g. changing the client
test size does not change the train split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

# Random-stream tags for build_fedlt (never change them: they fix the splits).
_STREAM_LONG_TAIL = 0
_STREAM_DIRICHLET = 1
_STREAM_CLIENT_TEST = 2

# floor() tolerance: n_max * IF^(-c/(C-1)) is computed in floating point, and a
# value that is mathematically an integer (e.g. 500 * 100^-1 = 5) may come out
# as 4.999999999; we add this before flooring so such values are not lost.
_FLOOR_EPS = 1e-9


def long_tail_counts(n_max: int, imbalance_factor: float, num_classes: int) -> np.ndarray:
    """Per-class counts of an exponential long-tail profile (int64 ``[C]``).

    ``n_c = max(1, floor(n_max * IF^(-c/(C-1)) + 1e-9))`` for ``c = 0..C-1``.
    Class 0 gets ``n_max``; class C-1 gets ``floor(n_max / IF)``. Every class
    keeps at least one sample, even when ``n_max / IF < 1`` (otherwise the
    class would vanish from training). ``IF = 1`` gives ``n_max`` for every
    class; ``C = 1`` gives ``[n_max]``.
    """
    n_max = int(n_max)
    imbalance_factor = float(imbalance_factor)
    num_classes = int(num_classes)
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if not math.isfinite(imbalance_factor) or imbalance_factor < 1.0:
        raise ValueError(f"imbalance_factor must be a finite number >= 1 (n_max / n_min), got {imbalance_factor}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    c = np.arange(num_classes, dtype=np.float64)
    raw = n_max * imbalance_factor ** (-c / (num_classes - 1))
    counts = np.floor(raw + _FLOOR_EPS).astype(np.int64)
    return np.maximum(counts, 1)


def sample_long_tail(
    labels: np.ndarray | Sequence[int], counts: np.ndarray | Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Indices (sorted, int64) of ``counts[c]`` samples of each class ``c``.

    Drawn without replacement from the positions of ``labels`` that carry
    class ``c``. Raises :class:`DataError` if a class has fewer samples than asked.
    """
    labels = np.asarray(labels).reshape(-1)
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if (counts < 0).any():
        raise ValueError(f"counts must be non-negative, got {counts.tolist()}")
    chosen = []
    for c, n in enumerate(counts.tolist()):
        avail = np.flatnonzero(labels == c)
        if len(avail) < n:
            raise DataError(
                f"long-tail sampling: class {c} asks for {n} samples but only "
                f"{len(avail)} are available in the train pool; lower data.n-max "
                f"(at most {len(avail)} for this class) or use a larger pool"
            )
        if n:
            chosen.append(rng.choice(avail, size=n, replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def dirichlet_split(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    alpha: float,
    min_samples: int,
    rng: np.random.Generator,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` across clients, per class Dirichlet.

    For every class (in increasing label order) draw ``p ~ Dir(alpha * 1_K)``,
    shuffle that class's positions and cut them at ``floor(cumsum(p) * n_c)``.
    The whole draw is repeated (up to ``max_tries`` times) until every client
    has at least ``min_samples`` positions. Returns one sorted int64 array per
    client; together they partition ``range(len(labels))`` exactly.

    Small ``alpha`` -> each class concentrates on few clients (skewed); large
    ``alpha`` -> every client gets about the global label distribution.
    """
    labels = np.asarray(labels).reshape(-1)
    num_clients = int(num_clients)
    min_samples = int(min_samples)
    alpha = float(alpha)
    n = len(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be a finite number > 0, got {alpha}")
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    if n < num_clients * min_samples:
        raise DataError(
            f"Dirichlet split impossible: {n} samples cannot give each of "
            f"{num_clients} clients at least {min_samples} samples (needs "
            f"{num_clients * min_samples}); use fewer clients or a lower data.min-client-samples, "
            "or raise data.n-max / lower data.imbalance-factor to get more LT samples"
        )
    classes = np.unique(labels)
    per_class = [np.flatnonzero(labels == c) for c in classes]
    best_min = -1
    for _ in range(max(1, int(max_tries))):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in per_class:
            p = rng.dirichlet(np.full(num_clients, alpha))
            if not np.all(np.isfinite(p)):  # defensive: degenerate draw
                p = np.full(num_clients, 1.0 / num_clients)
            perm = rng.permutation(idx)
            cuts = np.floor(np.cumsum(p)[:-1] * len(idx) + _FLOOR_EPS).astype(np.int64)
            cuts = np.clip(cuts, 0, len(idx))
            for k, piece in enumerate(np.split(perm, cuts)):
                parts[k].append(piece)
        sizes = [sum(len(x) for x in pk) for pk in parts]
        best_min = max(best_min, min(sizes))
        if min(sizes) >= min_samples:
            return [np.sort(np.concatenate(pk)).astype(np.int64) if pk else np.zeros(0, np.int64) for pk in parts]
    raise DataError(
        f"Dirichlet split failed: after {max_tries} draws (alpha={alpha}, "
        f"{num_clients} clients, {n} samples, {len(classes)} classes) no draw gave "
        f"every client >= {min_samples} samples (best smallest client: {best_min}); "
        "raise data.dirichlet-alpha, lower data.min-client-samples or use fewer clients"
    )


def client_test_indices(
    client_train_labels: np.ndarray | Sequence[int],
    test_labels: np.ndarray | Sequence[int],
    num_classes: int,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A client's test set (sorted int64 indices into ``test_labels``).

    With ``p_c`` the fraction of class ``c`` in the client's train labels, the
    client gets ``n_c = min(floor(p_c * size + 0.5), available_c)`` test images
    of class ``c`` (round half up, capped by how many the global test set has),
    drawn without replacement. The total is ``size`` up to rounding (and the
    cap); classes the client never trains on get no test images.
    """
    train = np.asarray(client_train_labels).reshape(-1)
    test = np.asarray(test_labels).reshape(-1)
    num_classes = int(num_classes)
    size = int(size)
    if len(train) == 0:
        raise ValueError("client_test_indices: the client has no train samples")
    if size < 1:
        raise ValueError(f"client test size must be >= 1, got {size}")
    if train.min() < 0 or train.max() >= num_classes:
        raise ValueError(f"client train labels must lie in [0, {num_classes - 1}]")
    p = np.bincount(train, minlength=num_classes).astype(np.float64) / len(train)
    want = np.floor(p * size + 0.5).astype(np.int64)
    chosen = []
    for c in range(num_classes):
        if want[c] == 0:
            continue
        avail = np.flatnonzero(test == c)
        n = min(int(want[c]), len(avail))
        if n:
            chosen.append(rng.choice(avail, size=n, replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class FedLTSplit:
    """Result of :func:`build_fedlt`.

    class_counts:  global LT train count per class (int64 ``[C]``); defines
                   the Many / Medium / Few groups.
    train_indices: all LT train indices into ``bundle.train`` (sorted).
    client_train:  per client, sorted indices into ``bundle.train`` (a
                   partition of ``train_indices``).
    client_test:   per client, sorted indices into ``bundle.test``.
    """

    class_counts: np.ndarray
    train_indices: np.ndarray
    client_train: tuple[np.ndarray, ...]
    client_test: tuple[np.ndarray, ...]

    @property
    def num_clients(self) -> int:
        return len(self.client_train)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def build_fedlt(
    train_labels: np.ndarray | Sequence[int],
    test_labels: np.ndarray | Sequence[int],
    num_classes: int,
    num_clients: int,
    n_max: int,
    imbalance_factor: float,
    alpha: float,
    min_samples: int,
    client_test_size: int,
    seed: int,
) -> FedLTSplit:
    """Build the whole Fed-LT split; a pure function of its arguments.

    ``n_max = 0`` takes the whole train pool as the long-tailed train set, as it
    is (for datasets whose train list already is long-tailed: the standard
    ImageNet-LT and Places-LT splits); ``imbalance_factor`` is then unused.

    Streams: LT sampling uses ``SeedSequence([seed, 0])``, the Dirichlet split
    ``[seed, 1]``, and client ``k``'s test set ``[seed, 2, k]``.
    """
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    train_labels = np.asarray(train_labels).reshape(-1).astype(np.int64)
    test_labels = np.asarray(test_labels).reshape(-1).astype(np.int64)
    if n_max == 0:  # the pool already is the long-tailed train set (ImageNet-LT, Places-LT lists)
        counts = np.bincount(train_labels, minlength=num_classes).astype(np.int64)
        lt = np.arange(train_labels.shape[0], dtype=np.int64)
    else:
        counts = long_tail_counts(n_max, imbalance_factor, num_classes)
        lt = sample_long_tail(train_labels, counts, _rng(seed, _STREAM_LONG_TAIL))
    lt_labels = train_labels[lt]
    parts = dirichlet_split(lt_labels, num_clients, alpha, min_samples, _rng(seed, _STREAM_DIRICHLET))
    client_train = tuple(np.sort(lt[p]) for p in parts)
    empty = [k for k, ct in enumerate(client_train) if len(ct) == 0]
    if empty:  # only reachable with min_samples = 0 (the run config asks for >= 1)
        raise DataError(
            f"Fed-LT split: client(s) {empty} received no train samples (min_samples={min_samples}); "
            "a client needs at least one sample to train and to draw its test set: "
            "raise data.min-client-samples (>= 1) or data.dirichlet-alpha, or use fewer clients"
        )
    client_test = tuple(
        client_test_indices(
            train_labels[ct],
            test_labels,
            num_classes,
            client_test_size,
            _rng(seed, _STREAM_CLIENT_TEST, k),
        )
        for k, ct in enumerate(client_train)
    )
    return FedLTSplit(
        class_counts=counts,
        train_indices=lt,
        client_train=client_train,
        client_test=client_test,
    )
