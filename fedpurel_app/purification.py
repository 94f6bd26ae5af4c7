"""Gradient purification, METHOD.md "Stage 1", steps 4-5.

With ``g_task`` the gradient of ``L_task = CE(f, y)`` and ``g_align`` the
gradient of ``L_align = TKL(z || f)`` with respect to phi_g, for every unit
(each parameter tensor, or one flattened vector over all of phi_g)::

    if <g_task, g_align> < 0:
        g = g_task - (<g_task, g_align> / (||g_align||^2 + eps)) * g_align
    else:
        g = g_task

i.e. the component of the task gradient that conflicts with the alignment
direction is projected out. ``g_align`` itself is never added. The epsilon
guards ``||g_align|| = 0`` (the reference produces NaN there).

Dot products and norms are computed in float64 (no overflow for any finite
float32 gradient); the projection runs in float32 (float64 for float64 input)
and each purified gradient is returned in the dtype of its task gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "GRANULARITIES",
    "PurificationStats",
    "purify_gradients",
    "purify_gradients_with_stats",
]

#: Accepted values of ``granularity``.
GRANULARITIES: tuple[str, ...] = ("tensor", "flat")


@dataclass(frozen=True)
class PurificationStats:
    """Diagnostics of one purification call.

    Attributes:
        conflict: fraction of units (tensors for "tensor", the single
            flattened vector for "flat") with ``<g_task, g_align> < 0``, in [0, 1].
        cosine: cosine similarity between the full flattened task and align
            gradients before purification; 0.0 if either is zero.

    Floats, or 0-d tensors on the gradients' device when asked for
    (``purify_gradients_with_stats(..., on_device=True)``).
    """

    conflict: float | Tensor
    cosine: float | Tensor


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _pairs(
    task_grads: Sequence[Optional[Tensor]],
    align_grads: Sequence[Optional[Tensor]],
) -> list[tuple[Tensor, Tensor, bool]]:
    """Validate inputs and fill ``None`` with zeros.

    Returns ``(g_task, g_align, task_was_none)`` triples.
    """
    if len(task_grads) != len(align_grads):
        raise ValueError(
            f"task_grads and align_grads must have the same length, got "
            f"{len(task_grads)} and {len(align_grads)}"
        )
    out: list[tuple[Tensor, Tensor, bool]] = []
    for i, (gt, ga) in enumerate(zip(task_grads, align_grads)):
        if gt is None and ga is None:
            raise ValueError(f"task and align gradients are both None at index {i}")
        if gt is None:
            assert ga is not None
            out.append((torch.zeros_like(ga), ga, True))
            continue
        if ga is None:
            ga = torch.zeros_like(gt)
        if gt.shape != ga.shape:
            raise ValueError(
                f"gradient shapes differ at index {i}: task {tuple(gt.shape)} "
                f"vs align {tuple(ga.shape)}"
            )
        out.append((gt, ga, False))
    return out


def _purify(
    task_grads: Sequence[Optional[Tensor]],
    align_grads: Sequence[Optional[Tensor]],
    granularity: str,
    eps: float,
) -> tuple[list[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Shared implementation.

    Returns ``(purified, unit_conflicts, dot_total, task_sq_total, align_sq_total)``
    where the last four are 0-d/1-d tensors (``None`` for empty input) kept
    on-device so that callers that do not need statistics never synchronise.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity {granularity!r}; accepted values: {', '.join(map(repr, GRANULARITIES))}"
        )
    pairs = _pairs(task_grads, align_grads)
    if not pairs:
        return [], None, None, None, None

    device = pairs[0][0].device
    acc = _acc_dtype(*(t for pair in pairs for t in pair[:2]))
    # Per tensor, one float64 2x2 Gram matrix of (g_task, g_align): <g_task, g_align>
    # and both squared norms in one product (float64: squared norms of float32
    # gradients above ~1.8e19 overflow float32 and would turn the projection into NaN).
    grams = []
    for gt, ga, _ in pairs:
        both = torch.stack([gt.detach().reshape(-1), ga.detach().to(gt.device).reshape(-1)]).to(torch.float64)
        grams.append((both @ both.T).to(device))
    gram = torch.stack(grams)  # [n_tensors, 2, 2]
    dot_t, task_sq_t, align_sq_t = gram[:, 0, 1], gram[:, 0, 0], gram[:, 1, 1]

    if granularity == "tensor":
        unit_dot = dot_t
        unit_sq = align_sq_t
    else:  # "flat": one unit over all tensors
        unit_dot = dot_t.sum().expand_as(dot_t)
        unit_sq = align_sq_t.sum().expand_as(dot_t)
    conflict = unit_dot < 0
    coef = torch.where(conflict, unit_dot / (unit_sq + eps), 0.0).to(acc)

    purified: list[Tensor] = []
    if device.type == "cpu" and all(t.device.type == "cpu" for pair in pairs for t in pair[:2]):
        # On the CPU reading the conflict flags costs nothing (no device to wait
        # for), and branching on them skips the projection of the tensors that do
        # not conflict and the select of those that do: the same values as the
        # torch.where path below, in fewer (tiny) operations.
        for flag, c, (gt, ga, task_was_none) in zip(conflict.tolist(), coef, pairs):
            out_dtype = ga.dtype if task_was_none else gt.dtype
            if flag:
                purified.append((gt.to(acc) - c * ga.to(acc)).to(out_dtype))
            else:
                purified.append(gt.to(out_dtype, copy=True))
    else:
        for i, (gt, ga, task_was_none) in enumerate(pairs):
            out_dtype = ga.dtype if task_was_none else gt.dtype
            c = coef[i].to(gt.device)
            projected = (gt.to(acc) - c * ga.to(acc)).to(out_dtype)
            purified.append(torch.where(conflict[i].to(gt.device), projected, gt.to(out_dtype)))

    unit_conflicts = conflict if granularity == "tensor" else conflict[:1]
    return purified, unit_conflicts, dot_t.sum(), task_sq_t.sum(), align_sq_t.sum()


def purify_gradients_with_stats(
    task_grads: Sequence[Optional[Tensor]],
    align_grads: Sequence[Optional[Tensor]],
    granularity: str = "tensor",
    eps: float = 1e-12,
    on_device: bool = False,
) -> tuple[list[Tensor], PurificationStats]:
    """Purify gradients and report conflict fraction and cosine.

    See :func:`purify_gradients` for the rule. ``PurificationStats.conflict``
    is the fraction of units that conflicted; ``PurificationStats.cosine`` is
    ``<G_task, G_align> / (||G_task|| ||G_align||)`` over the full flattened
    gradients before purification (0.0 if either is zero or not finite). Empty
    input gives ``([], PurificationStats(0.0, 0.0))``.

    With ``on_device`` both statistics are float64 0-d tensors on the
    gradients' device: a training loop can sum them over its steps and read
    them once, instead of waiting for the device at every step.
    """
    purified, conflicts, dot, tsq, asq = _purify(task_grads, align_grads, granularity, eps)
    if conflicts is None:
        return purified, PurificationStats(conflict=0.0, cosine=0.0)
    assert dot is not None and tsq is not None and asq is not None
    conflict = conflicts.to(torch.float64).mean()
    # A zero or non-finite norm or dot gives 0/0, x/inf or inf/inf: NaN or 0, reported as 0.
    cosine = (dot / (tsq.sqrt() * asq.sqrt())).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp(-1.0, 1.0)
    if on_device:
        return purified, PurificationStats(conflict=conflict, cosine=cosine)
    conflict_f, cosine_f = torch.stack([conflict, cosine]).tolist()
    return purified, PurificationStats(conflict=conflict_f, cosine=cosine_f)


def purify_gradients(
    task_grads: Sequence[Optional[Tensor]],
    align_grads: Sequence[Optional[Tensor]],
    granularity: str = "tensor",
    eps: float = 1e-12,
) -> list[Tensor]:
    """Gradient purification of the task gradient against the alignment gradient.

    For each unit (each tensor for ``granularity="tensor"``, the reference and
    default; one flattened vector over all tensors for ``"flat"``)::

        g = g_task - (<g_task, g_align> / (||g_align||^2 + eps)) * g_align   if <g_task, g_align> < 0
        g = g_task                                                          otherwise

    ``g_align`` is never added. ``None`` entries mean a zero gradient (a
    ``None`` task gradient yields ``zeros_like`` the align gradient); both
    ``None`` at the same index raises ``ValueError``. Inputs are not modified.

    Args:
        task_grads: gradients of ``L_task`` w.r.t. phi_g, one per parameter.
        align_grads: gradients of ``L_align`` w.r.t. phi_g, same order/shapes.
        granularity: ``"tensor"`` or ``"flat"``.
        eps: added to ``||g_align||^2`` in the projection coefficient.

    Returns:
        Purified gradients, one per parameter, in the task gradient's dtype.

    Raises:
        ValueError: length/shape mismatch, both gradients ``None``, or an
            unknown granularity.
    """
    purified, *_ = _purify(task_grads, align_grads, granularity, eps)
    return purified
