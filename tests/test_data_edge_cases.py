"""Fed-LT edge cases: each either works with a documented behaviour or stops with a clear message.

Synthetic label pools keep these fast; one case goes through the training loop
on real cached features (a client with a single sample of a single class).
"""

import numpy as np
import pytest
import torch

from fedpurel_app.data.fedlt import (
    build_fedlt,
    client_test_indices,
    dirichlet_split,
    long_tail_counts,
    sample_long_tail,
)
from fedpurel_app.errors import DataError
from fedpurel_app.metrics import class_counts, gm_summary, pm_summary

C = 10
TRAIN = np.repeat(np.arange(C), 200)
TEST = np.repeat(np.arange(C), 50)


def build(**overrides):
    args = dict(
        num_classes=C,
        num_clients=5,
        n_max=100,
        imbalance_factor=10.0,
        alpha=1.0,
        min_samples=2,
        client_test_size=40,
        seed=0,
    )
    args.update(overrides)
    return build_fedlt(TRAIN, TEST, **args)


def assert_partition(split):
    joined = np.sort(np.concatenate(split.client_train))
    assert np.array_equal(joined, split.train_indices)


# ------------------------------------------------------------ a client with no samples
def test_a_client_without_samples_is_refused_with_a_message_naming_it():
    """Only reachable with min_samples = 0 (the run config asks min-client-samples >= 1)."""
    with pytest.raises(DataError, match=r"client\(s\) \[.*\] received no train samples.*data\.min-client-samples"):
        build(num_clients=40, n_max=20, imbalance_factor=10.0, alpha=0.05, min_samples=0)


def test_client_test_set_of_an_empty_client_is_a_clear_error():
    with pytest.raises(ValueError, match="no train samples"):
        client_test_indices(np.zeros(0, np.int64), TEST, C, 10, np.random.default_rng(0))


# ------------------------------------------------------------ a client with a single class
def test_a_single_class_client_gets_a_single_class_test_set():
    test = client_test_indices(np.full(7, 3), TEST, C, 20, np.random.default_rng(0))
    assert len(test) == 20 and set(TEST[test]) == {3}


def test_a_single_class_client_scores_like_any_other():
    """PM: a client that only knows class 3 is one client among others, not a crash."""
    clients = [class_counts(np.array([3, 3]), np.array([3, 3]), C), class_counts(np.array([1, 2]), np.array([1, 1]), C)]
    summary = pm_summary(clients, long_tail_counts(100, 10.0, C), 40, 10)
    assert summary["per_client"] == [1.0, 0.5] and summary["all"] == 0.75
    assert summary["per_class"][3] == 1.0 and summary["per_class"][1] == 0.5 and summary["per_class"][0] is None


def test_training_on_one_sample_of_one_class_is_finite(small_cfg):
    """batch-size 16 on a client holding 1 sample: one step per epoch, finite phi_g and phi_k."""
    from fedpurel_app.config import NodeConfig
    from fedpurel_app.data.client import client_data
    from fedpurel_app.inputs import FeatureSet, client_feature_sets, clip_of, feature_cache_dir
    from fedpurel_app.methods.base import build_method
    from fedpurel_app.peft.base import build_peft, input_kind
    from fedpurel_app.training import seeded_generator, train_global, train_private

    clip = clip_of(small_cfg.model, small_cfg.data)
    data = client_data(small_cfg.data, small_cfg.seed, NodeConfig(partition_id=0, num_partitions=5))
    model = build_peft(small_cfg, clip, data.classnames, data.template)
    train, _ = client_feature_sets(clip, input_kind(small_cfg.peft.name), data, feature_cache_dir(small_cfg.model))
    one = FeatureSet(train.features[:1], train.labels[:1], train.zero_shot_logits[:1])
    options = build_method(small_cfg).stage1_options("fp32")
    stats = train_global(model, one, options, 2, 16, seeded_generator(0, 1, 1, 0))
    assert stats.steps == 2
    assert all(torch.isfinite(v).all() for v in model.global_state().values())
    loss = train_private(model, one, 0.9, 0.1, 2, 16, seeded_generator(0, 2, 1, 0))
    assert np.isfinite(loss) and all(torch.isfinite(v).all() for v in model.private_state().values())


# ------------------------------------------------------------ a class with no long-tailed samples
def test_every_class_keeps_at_least_one_long_tailed_sample():
    """n_max / IF < 1 would floor the tail to 0: the profile keeps 1 so no class vanishes."""
    counts = long_tail_counts(5, 1000.0, C)
    assert counts.min() == 1
    split = build(n_max=5, imbalance_factor=1000.0, min_samples=1, num_clients=3)
    assert set(TRAIN[split.train_indices]) == set(range(C))


def test_a_class_absent_from_the_pool_is_a_clear_error():
    pool = TRAIN[TRAIN != 9]
    with pytest.raises(DataError, match="class 9 asks for 1 samples but only 0 are available"):
        build_fedlt(pool, TEST, C, 3, 100, 100.0, 1.0, 1, 20, 0)


def test_a_class_with_zero_count_is_simply_absent_and_scored_as_few():
    counts = np.array([5, 0, 3])
    labels = np.repeat(np.arange(3), 10)
    chosen = sample_long_tail(labels, counts, np.random.default_rng(0))
    assert np.bincount(labels[chosen], minlength=3).tolist() == [5, 0, 3]
    parts = dirichlet_split(labels[chosen], 2, 1.0, 1, np.random.default_rng(0))
    assert sum(len(p) for p in parts) == 8
    summary = gm_summary(np.array([0, 1, 2]), np.array([0, 1, 2]), counts, 4, 2)
    assert summary["few"] == 1.0 and summary["many"] == 1.0 and summary["medium"] == 1.0


# ------------------------------------------------------------ IF = 1
def test_imbalance_factor_one_is_a_balanced_split_with_empty_groups():
    split = build(imbalance_factor=1.0, n_max=50)
    assert split.class_counts.tolist() == [50] * C
    assert_partition(split)
    summary = gm_summary(TEST, TEST, split.class_counts, 40, 10)
    assert summary["many"] == 1.0
    assert summary["medium"] is None and summary["few"] is None  # empty groups are None, not NaN


# ------------------------------------------------------------ extreme Dirichlet alpha
def test_alpha_0_01_concentrates_each_class_on_one_client():
    split = build(alpha=0.01, min_samples=1, num_clients=3, n_max=60)
    assert_partition(split)
    labels = TRAIN
    for c in range(C):
        shares = [np.sum(labels[ct] == c) for ct in split.client_train]
        assert max(shares) >= 0.9 * sum(shares)


def test_alpha_0_01_that_cannot_feed_every_client_stops_with_advice():
    with pytest.raises(DataError, match="Dirichlet split failed: after 50 draws.*raise data\\.dirichlet-alpha"):
        dirichlet_split(np.repeat(np.arange(C), 20), 20, 0.01, 4, np.random.default_rng(0), max_tries=50)


def test_alpha_1000_gives_every_client_about_the_global_distribution():
    split = build(alpha=1000.0, num_clients=4, imbalance_factor=1.0, n_max=100)
    assert_partition(split)
    for ct in split.client_train:
        share = np.bincount(TRAIN[ct], minlength=C) / len(ct)
        np.testing.assert_allclose(share, np.full(C, 0.1), atol=0.03)


# ------------------------------------------------------------ more clients than samples
def test_more_clients_than_samples_is_refused_before_any_draw():
    split_size = int(long_tail_counts(10, 10.0, C).sum())
    expected = rf"Dirichlet split impossible: {split_size} samples cannot give each of 100 clients"
    with pytest.raises(DataError, match=expected):
        build(n_max=10, num_clients=100, min_samples=1)


def test_more_clients_than_samples_through_the_run_config_is_one_setup_message(small_cfg):
    """A DataError is a UserError: the apps end the run with this one message."""
    from fedpurel_app.data.client import fedlt_split
    from fedpurel_app.errors import UserError

    with pytest.raises(DataError, match="Dirichlet split impossible.*use fewer clients") as err:
        fedlt_split(small_cfg.data, small_cfg.seed, 5000)
    assert isinstance(err.value, UserError)
