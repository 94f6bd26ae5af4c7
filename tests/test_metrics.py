"""Tests for fedpurel_app.metrics (docs/METHOD.md "Metrics")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedpurel_app.metrics import (
    class_counts,
    class_groups,
    gm_summary,
    per_class_accuracy,
    pm_summary,
    summary_from_counts,
)


def test_per_class_accuracy_hand():
    preds = np.array([0, 0, 1, 2])
    labels = np.array([0, 1, 1, 2])
    acc = per_class_accuracy(preds, labels, 4)
    assert acc.shape == (4,)
    assert acc[:3].tolist() == [1.0, 0.5, 1.0]
    assert math.isnan(acc[3])


def test_per_class_accuracy_validation():
    with pytest.raises(ValueError):
        per_class_accuracy(np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(ValueError):
        per_class_accuracy(np.array([0]), np.array([5]), 2)


def test_class_groups_threshold_boundaries():
    counts = np.array([101, 100, 21, 20, 0, 500])
    groups = class_groups(counts, many_threshold=100, few_threshold=20)
    assert groups["many"].tolist() == [0, 5]  # > 100
    assert groups["medium"].tolist() == [1, 2]  # 20 < n <= 100 (100 is Medium)
    assert groups["few"].tolist() == [3, 4]  # <= 20 (20 is Few)
    # custom thresholds for small datasets
    g2 = class_groups(np.array([10, 5, 2]), many_threshold=5, few_threshold=2)
    assert g2["many"].tolist() == [0] and g2["medium"].tolist() == [1] and g2["few"].tolist() == [2]
    with pytest.raises(ValueError):
        class_groups(counts, many_threshold=10, few_threshold=20)


def test_gm_summary_zero_accuracy_classes_included():
    # classes: 0 Many (200), 1 Medium (50), 2 Few (10), 3 Few (5, no test samples), 4 Few (3)
    train_counts = np.array([200, 50, 10, 5, 3])
    labels = np.array([0, 0, 1, 1, 2, 2, 4, 4])
    preds = np.array([0, 0, 1, 0, 1, 1, 4, 4])
    # per-class: [1.0, 0.5, 0.0, NaN, 1.0]
    # Few = mean(class 2 = 0.0, class 4 = 1.0) = 0.5 (the reference would drop the
    # zero and report 1.0); class 3 has no test samples and is excluded.
    s = gm_summary(preds, labels, train_counts, 100, 20)
    assert s["all"] == pytest.approx(5 / 8)
    assert s["many"] == pytest.approx(1.0)
    assert s["medium"] == pytest.approx(0.5)
    assert s["few"] == pytest.approx(0.5)
    assert s["balancedness"] == pytest.approx(0.0)
    assert s["per_class"] == [1.0, 0.5, 0.0, None, 1.0]
    assert s["per_class_std"] == pytest.approx(float(np.std([1.0, 0.5, 0.0, 1.0])))
    json.dumps(s, allow_nan=False)
    assert all(type(s[k]) is float for k in ("all", "many", "medium", "few", "balancedness", "per_class_std"))


def test_gm_summary_all_zero_group_is_zero_not_none():
    train_counts = np.array([200, 10])
    labels = np.array([0, 1, 1])
    preds = np.array([0, 0, 0])
    s = gm_summary(preds, labels, train_counts, 100, 20)
    assert s["few"] == 0.0
    assert s["medium"] is None  # empty group
    assert s["all"] == pytest.approx(1 / 3)


def test_gm_summary_empty_test_set():
    s = gm_summary(np.array([], dtype=int), np.array([], dtype=int), np.array([5, 500]), 100, 20)
    assert s["all"] is None and s["balancedness"] is None and s["few"] is None
    assert s["per_class"] == [None, None]
    json.dumps(s, allow_nan=False)


def test_class_counts_hand():
    correct, total = class_counts(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 4)
    assert correct.tolist() == [1, 1, 1, 0] and total.tolist() == [2, 2, 1, 0]
    assert correct.dtype == total.dtype == np.int64
    empty = class_counts(np.array([], dtype=int), np.array([], dtype=int), 3)
    assert [c.tolist() for c in empty] == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError):
        class_counts(np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(ValueError):
        class_counts(np.array([0]), np.array([2]), 2)
    with pytest.raises(ValueError):
        class_counts(np.array([0]), np.array([0]), 0)


def test_summary_from_counts_is_gm_summary_of_the_predictions():
    train_counts = np.array([200, 50, 10, 5, 3])
    labels = np.array([0, 0, 1, 1, 2, 2, 4, 4])
    preds = np.array([0, 0, 1, 0, 1, 1, 4, 4])
    assert summary_from_counts(*class_counts(preds, labels, 5), train_counts, 100, 20) == gm_summary(
        preds, labels, train_counts, 100, 20
    )
    with pytest.raises(ValueError):
        summary_from_counts([1, 0], [1, 1], train_counts, 100, 20)


def _client(preds, labels, num_classes=3):
    return class_counts(np.asarray(preds, dtype=int), np.asarray(labels, dtype=int), num_classes)


def test_pm_summary_weighted_vs_unweighted():
    train_counts = np.array([200, 50, 10])
    # client A: 2 samples, both correct -> acc 1.0
    # client B: 8 samples, 2 correct -> acc 0.25
    # client C: no test samples -> skipped
    # unweighted = (1.0 + 0.25) / 2 = 0.625 ; weighted = (2 + 2) / (2 + 8) = 0.4
    a_labels, a_preds = np.array([0, 1]), np.array([0, 1])
    b_labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    b_preds = np.array([0, 1, 1, 0, 0, 0, 0, 0])
    s = pm_summary([_client(a_preds, a_labels), _client(b_preds, b_labels), _client([], [])], train_counts, 100, 20)
    assert s["all"] == pytest.approx(0.625)
    assert s["all_weighted"] == pytest.approx(0.4)
    assert s["num_clients"] == 3
    assert s["per_client"] == [1.0, 0.25, None]
    # pooled: class 0: 2/3, class 1: 2/3, class 2: 0/4
    assert s["many"] == pytest.approx(2 / 3)
    assert s["medium"] == pytest.approx(2 / 3)
    assert s["few"] == pytest.approx(0.0)
    assert s["balancedness"] == pytest.approx(0.0)
    pooled = gm_summary(np.concatenate([a_preds, b_preds]), np.concatenate([a_labels, b_labels]), train_counts, 100, 20)
    for key in ("many", "medium", "few", "balancedness", "per_class_std", "per_class"):
        assert s[key] == pooled[key]
    assert pooled["all"] == pytest.approx(s["all_weighted"])
    json.dumps(s, allow_nan=False)


def test_pm_summary_keeps_the_client_order():
    train_counts = np.array([200, 50, 10])
    clients = [_client([0], [0]), _client([1, 0], [1, 1]), _client([0, 0, 0, 2], [2, 2, 2, 2])]
    assert pm_summary(clients, train_counts, 100, 20)["per_client"] == [1.0, 0.5, 0.25]
    assert pm_summary(clients[::-1], train_counts, 100, 20)["per_client"] == [0.25, 0.5, 1.0]


def test_pm_summary_no_samples():
    s = pm_summary([_client([], [], 2)], np.array([1, 2]), 100, 20)
    assert s["all"] is None and s["all_weighted"] is None and s["num_clients"] == 1
    json.dumps(s, allow_nan=False)
    empty = pm_summary([], np.array([1, 2]), 100, 20)
    assert empty["all"] is None and empty["num_clients"] == 0 and empty["per_client"] == []
    # A client's counts must cover the C classes of the run.
    with pytest.raises(ValueError, match="2 classes"):
        pm_summary([(np.array([1]), np.array([1]))], np.array([1, 2]), 100, 20)
    with pytest.raises(ValueError):
        pm_summary([(np.array([1, 0]), np.array([1, 0, 0]))], np.array([1, 2]), 100, 20)
