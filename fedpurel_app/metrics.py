"""Evaluation metrics, METHOD.md "Metrics" and "Data protocol".

* GM (global model on the balanced global test set): overall accuracy,
  Many / Medium / Few group accuracies, per-class accuracies, balancedness.
* PM (personalized models on client test sets): unweighted mean of client
  accuracies (reference), sample-weighted mean, and the group metrics on the
  predictions pooled over clients.

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

from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["per_class_accuracy", "class_groups", "gm_summary", "pm_summary"]

GROUP_NAMES: tuple[str, ...] = ("many", "medium", "few")


def _as_1d_int(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must contain integer class indices")
    return arr.astype(np.int64, copy=False)


def _opt_float(x: Any) -> Optional[float]:
    """Python float, or None for NaN / missing."""
    if x is None:
        return None
    x = float(x)
    return None if np.isnan(x) else x


def per_class_accuracy(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Per-class accuracy ``acc_c = #{i: y_i = c, pred_i = c} / #{i: y_i = c}``.

    Args:
        preds: ``[N]`` predicted class indices.
        labels: ``[N]`` true class indices in ``[0, num_classes)``.
        num_classes: C.

    Returns:
        ``[C]`` float64 array, NaN for classes with no test samples.
    """
    preds = _as_1d_int(preds, "preds")
    labels = _as_1d_int(labels, "labels")
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels differ in length: {preds.shape[0]} vs {labels.shape[0]}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[preds == labels], minlength=num_classes).astype(np.float64)
    acc = np.full(num_classes, np.nan, dtype=np.float64)
    has = counts > 0
    acc[has] = correct[has] / counts[has]
    return acc


def class_groups(
    train_counts: Any, many_threshold: float = 100, few_threshold: float = 20
) -> dict[str, np.ndarray]:
    """Split classes into Many / Medium / Few by their global train count.

    ``many``: ``n > many_threshold``; ``medium``:
    ``few_threshold < n <= many_threshold``; ``few``: ``n <= few_threshold``.

    Returns:
        ``{"many", "medium", "few"}`` -> sorted int64 arrays of class indices.
    """
    if few_threshold > many_threshold:
        raise ValueError(
            f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})"
        )
    counts = np.asarray(train_counts, dtype=np.float64).reshape(-1)
    return {
        "many": np.flatnonzero(counts > many_threshold),
        "medium": np.flatnonzero((counts > few_threshold) & (counts <= many_threshold)),
        "few": np.flatnonzero(counts <= few_threshold),
    }


def _summary(
    preds: np.ndarray,
    labels: np.ndarray,
    train_counts: Any,
    many_threshold: float,
    few_threshold: float,
) -> dict[str, Any]:
    """Shared GM / pooled-PM logic: overall, group, worst-class metrics."""
    counts = np.asarray(train_counts).reshape(-1)
    num_classes = int(counts.shape[0])
    acc = per_class_accuracy(preds, labels, num_classes)
    labels = _as_1d_int(labels, "labels")
    preds = _as_1d_int(preds, "preds")
    valid = ~np.isnan(acc)
    out: dict[str, Any] = {
        "all": float(np.mean(preds == labels)) if labels.size else None,
    }
    for name, idx in class_groups(counts, many_threshold, few_threshold).items():
        group_acc = acc[idx][valid[idx]]
        out[name] = float(group_acc.mean()) if group_acc.size else None
    out["balancedness"] = float(acc[valid].min()) if valid.any() else None
    out["per_class_std"] = float(acc[valid].std()) if valid.any() else None
    out["per_class"] = [_opt_float(a) for a in acc]
    return out


def gm_summary(
    preds: Any,
    labels: Any,
    train_counts: Any,
    many_threshold: float = 100,
    few_threshold: float = 20,
) -> dict[str, Any]:
    """Global-model metrics on one test set.

    Keys: ``all`` (accuracy over all test samples), ``many`` / ``medium`` /
    ``few`` (mean per-class accuracy within the group, zero-accuracy classes
    included, classes without test samples excluded, ``None`` for an empty
    group), ``balancedness`` (min per-class accuracy), ``per_class_std``,
    ``per_class`` (list, ``None`` for classes without test samples).

    Args:
        preds, labels: ``[N]`` class indices.
        train_counts: ``[C]`` global long-tailed train count per class (also
            defines C).
    """
    return _summary(preds, labels, train_counts, many_threshold, few_threshold)


def pm_summary(
    client_preds: Sequence[Any],
    client_labels: Sequence[Any],
    train_counts: Any,
    many_threshold: float = 100,
    few_threshold: float = 20,
) -> dict[str, Any]:
    """Personalized-model metrics over clients.

    * ``all``: unweighted mean over clients of ``acc_k`` (reference), clients
      with no test samples skipped (``None`` if none has samples);
    * ``all_weighted``: ``sum_k correct_k / sum_k n_k``;
    * ``many`` / ``medium`` / ``few`` / ``balancedness`` / ``per_class_std`` /
      ``per_class``: as in :func:`gm_summary` on predictions pooled over clients;
    * ``per_client``: list of client accuracies (``None`` for empty clients);
    * ``num_clients``: number of clients passed in.
    """
    if len(client_preds) != len(client_labels):
        raise ValueError(
            f"client_preds and client_labels differ in length: {len(client_preds)} vs {len(client_labels)}"
        )
    preds_list = [_as_1d_int(p, "preds") for p in client_preds]
    labels_list = [_as_1d_int(y, "labels") for y in client_labels]
    per_client: list[Optional[float]] = []
    correct_total, n_total = 0, 0
    for p, y in zip(preds_list, labels_list):
        if p.shape != y.shape:
            raise ValueError(f"client preds and labels differ in length: {p.shape[0]} vs {y.shape[0]}")
        n = int(y.size)
        correct = int(np.sum(p == y))
        per_client.append(correct / n if n else None)
        correct_total += correct
        n_total += n
    evaluated = [a for a in per_client if a is not None]

    pooled_preds = np.concatenate(preds_list) if preds_list else np.zeros(0, dtype=np.int64)
    pooled_labels = np.concatenate(labels_list) if labels_list else np.zeros(0, dtype=np.int64)
    pooled = _summary(pooled_preds, pooled_labels, train_counts, many_threshold, few_threshold)

    out: dict[str, Any] = {
        "all": float(np.mean(evaluated)) if evaluated else None,
        "all_weighted": correct_total / n_total if n_total else None,
    }
    for key in (*GROUP_NAMES, "balancedness", "per_class_std", "per_class"):
        out[key] = pooled[key]
    out["per_client"] = per_client
    out["num_clients"] = len(per_client)
    return out
