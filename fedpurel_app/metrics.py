"""Evaluation metrics (docs/METHOD.md "Metrics").

* GM (global model on the balanced global test set): overall accuracy,
  Many / Medium / Few group accuracies, per-class accuracies, balancedness.
* PM (personalized models on client test sets): unweighted mean of client
  accuracies (reference), sample-weighted mean, and the group metrics on the
  predictions pooled over clients.

Everything is computed from per-class counts (:func:`class_counts`: correct
predictions and samples of every class), which is all a client sends: no
per-sample label or prediction leaves it.

Groups are defined by the global long-tailed train count of each class:
Many ``n > many_threshold``, Medium ``few_threshold < n <= many_threshold``,
Few ``n <= few_threshold`` (100 / 20 by default).

Group accuracy = mean of the per-class accuracies of the group's classes
that have test samples; zero-accuracy classes are INCLUDED (the reference
drops them, a bug). Balancedness = worst-class accuracy (min over classes
with test samples); ``per_class_std`` = population std (ddof=0) of the same
per-class accuracies. All accuracies are fractions in [0, 1]; outputs are
plain Python floats/lists (``None`` where undefined) so they are JSON-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["class_counts", "class_groups", "gm_summary", "per_class_accuracy", "pm_summary", "summary_from_counts"]

GROUP_NAMES: tuple[str, ...] = ("many", "medium", "few")


def _as_1d_int(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must contain integer class indices")
    return arr.astype(np.int64, copy=False)


def _opt_float(x: Any) -> float | None:
    """Python float, or None for NaN / missing."""
    if x is None:
        return None
    x = float(x)
    return None if np.isnan(x) else x


def class_counts(preds: Any, labels: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(correct, total)``, int64 ``[C]``: correct_c = #{i: y_i = c = pred_i}, total_c = #{i: y_i = c}."""
    preds = _as_1d_int(preds, "preds")
    labels = _as_1d_int(labels, "labels")
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels differ in length: {preds.shape[0]} vs {labels.shape[0]}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    total = np.bincount(labels, minlength=num_classes).astype(np.int64)
    correct = np.bincount(labels[preds == labels], minlength=num_classes).astype(np.int64)
    return correct, total


def _accuracy(correct: np.ndarray, total: np.ndarray) -> np.ndarray:
    """acc_c = correct_c / total_c, NaN for classes without samples."""
    acc = np.full(total.shape, np.nan, dtype=np.float64)
    has = total > 0
    acc[has] = correct[has].astype(np.float64) / total[has].astype(np.float64)
    return acc


def per_class_accuracy(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Per-class accuracy ``acc_c = #{i: y_i = c, pred_i = c} / #{i: y_i = c}`` ([C], NaN without samples)."""
    return _accuracy(*class_counts(preds, labels, num_classes))


def class_groups(train_counts: Any, many_threshold: float = 100, few_threshold: float = 20) -> dict[str, np.ndarray]:
    """Split classes into Many / Medium / Few by their global train count.

    ``many``: ``n > many_threshold``; ``medium``:
    ``few_threshold < n <= many_threshold``; ``few``: ``n <= few_threshold``.

    Returns:
        ``{"many", "medium", "few"}`` -> sorted int64 arrays of class indices.
    """
    if few_threshold > many_threshold:
        raise ValueError(f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})")
    counts = np.asarray(train_counts, dtype=np.float64).reshape(-1)
    return {
        "many": np.flatnonzero(counts > many_threshold),
        "medium": np.flatnonzero((counts > few_threshold) & (counts <= many_threshold)),
        "few": np.flatnonzero(counts <= few_threshold),
    }


def summary_from_counts(
    correct: Any, total: Any, train_counts: Any, many_threshold: float = 100, few_threshold: float = 20
) -> dict[str, Any]:
    """GM-style metrics of one test set from its per-class counts.

    Keys: ``all`` (sum correct / sum total), ``many`` / ``medium`` / ``few`` (mean per-class
    accuracy within the group, zero-accuracy classes included, classes without test samples
    excluded, ``None`` for an empty group), ``balancedness`` (min per-class accuracy),
    ``per_class_std``, ``per_class`` (list, ``None`` for classes without test samples).
    """
    correct = np.asarray(correct, dtype=np.int64).reshape(-1)
    total = np.asarray(total, dtype=np.int64).reshape(-1)
    counts = np.asarray(train_counts).reshape(-1)
    if not correct.shape == total.shape == counts.shape:
        raise ValueError(f"counts of {correct.shape[0]}, {total.shape[0]} and {counts.shape[0]} classes")
    acc = _accuracy(correct, total)
    valid = ~np.isnan(acc)
    n = int(total.sum())
    out: dict[str, Any] = {"all": int(correct.sum()) / n if n else None}
    for name, idx in class_groups(counts, many_threshold, few_threshold).items():
        group_acc = acc[idx][valid[idx]]
        out[name] = float(group_acc.mean()) if group_acc.size else None
    out["balancedness"] = float(acc[valid].min()) if valid.any() else None
    out["per_class_std"] = float(acc[valid].std()) if valid.any() else None
    out["per_class"] = [_opt_float(a) for a in acc]
    return out


def gm_summary(
    preds: Any, labels: Any, train_counts: Any, many_threshold: float = 100, few_threshold: float = 20
) -> dict[str, Any]:
    """Global-model metrics on one test set (:func:`summary_from_counts` of its predictions).

    Args:
        preds, labels: ``[N]`` class indices.
        train_counts: ``[C]`` global long-tailed train count per class (also defines C).
    """
    num_classes = int(np.asarray(train_counts).reshape(-1).shape[0])
    return summary_from_counts(*class_counts(preds, labels, num_classes), train_counts, many_threshold, few_threshold)


def pm_summary(
    clients: Sequence[tuple[Any, Any]], train_counts: Any, many_threshold: float = 100, few_threshold: float = 20
) -> dict[str, Any]:
    """Personalized-model metrics over clients, from each client's per-class ``(correct, total)``.

    * ``all``: unweighted mean over clients of ``acc_k`` (reference), clients
      with no test samples skipped (``None`` if none has samples);
    * ``all_weighted``: ``sum_k correct_k / sum_k n_k``;
    * ``many`` / ``medium`` / ``few`` / ``balancedness`` / ``per_class_std`` /
      ``per_class``: as in :func:`summary_from_counts` on the counts summed over clients;
    * ``per_client``: list of client accuracies (``None`` for empty clients);
    * ``num_clients``: number of clients passed in.
    """
    num_classes = int(np.asarray(train_counts).reshape(-1).shape[0])
    pooled_correct = np.zeros(num_classes, dtype=np.int64)
    pooled_total = np.zeros(num_classes, dtype=np.int64)
    per_client: list[float | None] = []
    for correct, total in clients:
        correct, total = np.asarray(correct, dtype=np.int64), np.asarray(total, dtype=np.int64)
        if correct.shape != (num_classes,) or total.shape != (num_classes,):
            raise ValueError(f"a client's counts are not of {num_classes} classes")
        n = int(total.sum())
        per_client.append(int(correct.sum()) / n if n else None)
        pooled_correct += correct
        pooled_total += total
    evaluated = [a for a in per_client if a is not None]
    pooled = summary_from_counts(pooled_correct, pooled_total, train_counts, many_threshold, few_threshold)
    out: dict[str, Any] = {"all": float(np.mean(evaluated)) if evaluated else None, "all_weighted": pooled["all"]}
    for key in (*GROUP_NAMES, "balancedness", "per_class_std", "per_class"):
        out[key] = pooled[key]
    out["per_client"] = per_client
    out["num_clients"] = len(per_client)
    return out
