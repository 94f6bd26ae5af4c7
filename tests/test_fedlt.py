"""Tests for the Fed-LT protocol (fedpurel_app/data/fedlt.py)."""

import math

import numpy as np
import pytest

from fedpurel_app.data.fedlt import (
    FedLTSplit,
    build_fedlt,
    client_test_indices,
    dirichlet_split,
    long_tail_counts,
    sample_long_tail,
)
from fedpurel_app.errors import DataError


# ---------------------------------------------------------------- counts
def test_long_tail_counts_formula_and_hand_values():
    n_max, imbalance, c = 150, 100.0, 10
    got = long_tail_counts(n_max, imbalance, c)
    expected = [max(1, math.floor(n_max * imbalance ** (-k / (c - 1)) + 1e-9)) for k in range(c)]
    assert got.tolist() == expected
    # written by hand: 150 * 100^(-k/9) = 150, 89.9, 53.9, 32.3, 19.4, 11.6, 6.96, 4.17, 2.50, 1.5
    assert got.tolist() == [150, 89, 53, 32, 19, 11, 6, 4, 2, 1]
    assert got.dtype == np.int64


def test_long_tail_counts_match_published_cifar_lt_sizes():
    # CIFAR-10-LT / CIFAR-100-LT sizes reported in the long-tail literature.
    assert long_tail_counts(5000, 100, 10).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(5000, 100, 10).sum() == 12406
    assert long_tail_counts(500, 100, 100).sum() == 10847
    assert long_tail_counts(500, 50, 100).sum() == 12608
    assert long_tail_counts(500, 10, 100).sum() == 19573
    cnt = long_tail_counts(500, 100, 100)
    assert cnt[0] == 500 and cnt[-1] == 5  # IF = n_max / n_min


def test_long_tail_counts_if1_min1_and_errors():
    assert long_tail_counts(150, 1, 10).tolist() == [150] * 10
    assert long_tail_counts(7, 3, 1).tolist() == [7]
    # n_max / IF < 1: every class still keeps one sample
    cnt = long_tail_counts(10, 1000, 5)
    assert cnt.min() == 1 and cnt[0] == 10
    assert np.all(np.diff(long_tail_counts(150, 100, 20)) <= 0)
    with pytest.raises(ValueError, match="imbalance_factor"):
        long_tail_counts(150, 0.5, 10)
    with pytest.raises(ValueError, match="n_max"):
        long_tail_counts(0, 10, 10)


# ---------------------------------------------------------------- LT sampling
def _pool(per_class=150, c=10, seed=123):
    labels = np.repeat(np.arange(c), per_class)
    return np.random.default_rng(seed).permutation(labels)


def test_sample_long_tail_exact_counts():
    labels = _pool()
    counts = long_tail_counts(150, 100, 10)
    idx = sample_long_tail(labels, counts, np.random.default_rng(0))
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    assert np.bincount(labels[idx], minlength=10).tolist() == counts.tolist()
    idx2 = sample_long_tail(labels, counts, np.random.default_rng(0))
    assert np.array_equal(idx, idx2)
    idx3 = sample_long_tail(labels, counts, np.random.default_rng(1))
    assert not np.array_equal(idx, idx3)


def test_sample_long_tail_not_enough_raises():
    labels = _pool(per_class=150)
    with pytest.raises(DataError) as e:
        sample_long_tail(labels, long_tail_counts(200, 100, 10), np.random.default_rng(0))
    msg = str(e.value)
    # names the class, what it asks for, what there is, and the run-config key to change
    assert "class 0" in msg and "200" in msg and "150" in msg and "data.n-max" in msg
    assert isinstance(e.value, ValueError)


# ---------------------------------------------------------------- Dirichlet
def _lt_labels():
    labels = _pool()
    idx = sample_long_tail(labels, long_tail_counts(150, 10, 10), np.random.default_rng(0))
    return labels[idx]


def test_dirichlet_split_partitions_exactly():
    lab = _lt_labels()
    parts = dirichlet_split(lab, 8, 0.5, 5, np.random.default_rng(3))
    assert len(parts) == 8
    allidx = np.concatenate(parts)
    assert len(allidx) == len(lab)
    assert np.array_equal(np.sort(allidx), np.arange(len(lab)))  # disjoint + union = all
    assert min(len(p) for p in parts) >= 5
    for p in parts:
        assert np.all(np.diff(p) > 0)


def test_dirichlet_split_seeded():
    lab = _lt_labels()
    a = dirichlet_split(lab, 6, 1.0, 5, np.random.default_rng(11))
    b = dirichlet_split(lab, 6, 1.0, 5, np.random.default_rng(11))
    c = dirichlet_split(lab, 6, 1.0, 5, np.random.default_rng(12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _max_share_per_class(lab, parts, c):
    # for every class, the largest fraction of it held by one client
    shares = np.stack([np.bincount(lab[p], minlength=c) for p in parts])  # [K, C]
    return (shares.max(0) / shares.sum(0)).mean()


def test_dirichlet_alpha_controls_skew():
    labels = np.repeat(np.arange(10), 200)
    k = 5
    uni = dirichlet_split(labels, k, 1000.0, 1, np.random.default_rng(0))
    skew = dirichlet_split(labels, k, 0.01, 1, np.random.default_rng(0))
    # alpha 1000: every client gets ~1/K of every class
    counts_uni = np.stack([np.bincount(labels[p], minlength=10) for p in uni])
    assert np.all(np.abs(counts_uni - 40) <= 12), counts_uni
    assert _max_share_per_class(labels, uni, 10) < 0.3
    # alpha 0.01: each class sits almost entirely on one client
    assert _max_share_per_class(labels, skew, 10) > 0.9


def test_dirichlet_impossible_raises_before_trying():
    lab = np.repeat(np.arange(3), 5)  # 15 samples
    with pytest.raises(DataError) as e:
        dirichlet_split(lab, 10, 1.0, 2, np.random.default_rng(0))
    msg = str(e.value)
    assert "15" in msg and "10" in msg and "20" in msg and "data.min-client-samples" in msg


def test_dirichlet_gives_up_with_message():
    # possible in principle, but alpha tiny + 1 class + many clients: never balanced
    lab = np.zeros(100, dtype=np.int64)
    with pytest.raises(DataError, match=r"raise data\.dirichlet-alpha"):
        dirichlet_split(lab, 10, 0.001, 5, np.random.default_rng(0), max_tries=20)


# ---------------------------------------------------------------- client test
def test_client_test_follows_train_proportions():
    test_labels = np.repeat(np.arange(10), 100)
    train = np.array([0] * 50 + [1] * 30 + [2] * 15 + [7] * 5)
    idx = client_test_indices(train, test_labels, 10, 200, np.random.default_rng(0))
    assert len(np.unique(idx)) == len(idx)  # no replacement
    got = np.bincount(test_labels[idx], minlength=10)
    assert got.tolist() == [100, 60, 30, 0, 0, 0, 0, 10, 0, 0]  # 0.5*200 = 100, capped at 100 anyway
    # proportions within rounding for a general case
    rng = np.random.default_rng(5)
    train = rng.choice(10, size=333, p=np.linspace(1, 10, 10) / 55)
    idx = client_test_indices(train, test_labels, 10, 150, np.random.default_rng(1))
    got = np.bincount(test_labels[idx], minlength=10)
    p = np.bincount(train, minlength=10) / len(train)
    assert np.all(np.abs(got - p * 150) <= 0.5 + 1e-9)


def test_client_test_capped_by_available():
    test_labels = np.repeat(np.arange(4), 10)
    train = np.array([0] * 9 + [1])
    idx = client_test_indices(train, test_labels, 4, 100, np.random.default_rng(0))
    assert np.bincount(test_labels[idx], minlength=4).tolist() == [10, 10, 0, 0]


# ---------------------------------------------------------------- build_fedlt
ARGS = dict(
    num_classes=10, num_clients=5, n_max=150, imbalance_factor=10, alpha=0.5, min_samples=10, client_test_size=100
)


def _build(seed):
    train_labels = _pool(150, 10, seed=7)
    test_labels = np.repeat(np.arange(10), 100)
    return train_labels, test_labels, build_fedlt(train_labels, test_labels, seed=seed, **ARGS)


def test_build_fedlt_consistent():
    train_labels, test_labels, s = _build(0)
    assert isinstance(s, FedLTSplit) and s.num_clients == 5
    assert s.class_counts.tolist() == long_tail_counts(150, 10, 10).tolist()
    assert np.bincount(train_labels[s.train_indices], minlength=10).tolist() == s.class_counts.tolist()
    allc = np.concatenate(s.client_train)
    assert np.array_equal(np.sort(allc), s.train_indices)
    assert min(len(c) for c in s.client_train) >= 10
    for tr, te in zip(s.client_train, s.client_test, strict=True):
        p = np.bincount(train_labels[tr], minlength=10) / len(tr)
        got = np.bincount(test_labels[te], minlength=10)
        assert np.all(np.abs(got - np.minimum(np.floor(p * 100 + 0.5), 100)) == 0)


def test_build_fedlt_deterministic_and_seed_dependent():
    _, _, a = _build(0)
    _, _, b = _build(0)
    _, _, c = _build(1)
    for x, y in zip(a.client_train + a.client_test, b.client_train + b.client_test, strict=True):
        assert np.array_equal(x, y)
    assert np.array_equal(a.train_indices, b.train_indices)
    assert not all(np.array_equal(x, y) for x, y in zip(a.client_train, c.client_train, strict=True))


def test_build_fedlt_stable_across_processes():
    # a fresh interpreter (like a Flower client) must compute the same split
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from fedpurel_app.data.fedlt import build_fedlt\n"
        "tr = np.random.default_rng(7).permutation(np.repeat(np.arange(10), 150))\n"
        "te = np.repeat(np.arange(10), 100)\n"
        "s = build_fedlt(tr, te, 10, 5, 150, 10, 0.5, 10, 100, 0)\n"
        "print(';'.join(','.join(map(str, c.tolist())) for c in s.client_train + s.client_test))\n"
    )
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    ).stdout.strip()
    _, _, s = _build(0)
    here = ";".join(",".join(map(str, c.tolist())) for c in s.client_train + s.client_test)
    assert out == here


def test_n_max_zero_takes_the_pool_as_it_is():
    """For ImageNet-LT / Places-LT the standard train list already is long-tailed."""
    from fedpurel_app.data.fedlt import build_fedlt

    labels = np.repeat(np.arange(4), [40, 20, 6, 2])
    test = np.repeat(np.arange(4), 10)
    split = build_fedlt(labels, test, 4, 3, 0, 100.0, 1.0, 2, 10, seed=0)
    assert split.class_counts.tolist() == [40, 20, 6, 2]
    assert sorted(np.concatenate(split.client_train).tolist()) == list(range(labels.size))
