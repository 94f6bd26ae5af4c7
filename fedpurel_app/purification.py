"""Gradient purification, docs/METHOD.md "Purification".

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

Dot products and norms come from one 2x2 Gram matrix of (g_task, g_align)
per tensor, in float64 on an accelerator and, on the CPU, in the gradients'
precision, redone in float64 when that overflows (no overflow for any finite
float32 gradient); the projection runs in float32 (float64 for float64 input)
and each purified gradient is returned in the dtype of its task gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GRANULARITIES",
    "PurificationStats",
    "purify_gradients",
    "purify_gradients_with_stats",
    "purify_stacked_with_stats",
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
    task_grads: Sequence[Tensor | None],
    align_grads: Sequence[Tensor | None],
) -> list[tuple[Tensor, Tensor, bool]]:
    """Validate inputs and fill ``None`` with zeros.

    Returns ``(g_task, g_align, task_was_none)`` triples.
    """
    if len(task_grads) != len(align_grads):
        raise ValueError(
            f"task_grads and align_grads must have the same length, got {len(task_grads)} and {len(align_grads)}"
        )
    out: list[tuple[Tensor, Tensor, bool]] = []
    for i, (gt, ga) in enumerate(zip(task_grads, align_grads, strict=True)):
        if gt is None and ga is None:
            raise ValueError(f"task and align gradients are both None at index {i}")
        if gt is None:
            assert ga is not None
            out.append((torch.zeros_like(ga), ga, True))
            continue
        if ga is None:
            ga = torch.zeros_like(gt)
        if gt.shape != ga.shape:
            raise ValueError(f"gradient shapes differ at index {i}: task {tuple(gt.shape)} vs align {tuple(ga.shape)}")
        out.append((gt, ga, False))
    return out


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; accepted values: {', '.join(map(repr, GRANULARITIES))}")


def _gram(both: Tensor, acc: torch.dtype, on_cpu: bool) -> Tensor:
    """float64 ``[[<t,t>, <t,a>], [<a,t>, <a,a>]]`` of the rows (g_task, g_align) of ``both`` ``[2, n]``.

    Squared norms of float32 gradients above ~1.8e19 overflow float32 and
    would turn the projection into NaN, so a device computes the product in
    float64. On the CPU, where reading a flag costs nothing, it is computed in
    the gradients' own precision (no float64 copy of phi_g-sized tensors: the
    largest cost of a purified adapter step at CLIP ViT-B/16's size) and
    redone in float64 only when that overflowed.
    """
    if on_cpu:
        rows = both.to(acc)
        gram = rows @ rows.T
        if bool(torch.isfinite(gram).all()):
            return gram.to(torch.float64)
    rows = both.to(torch.float64)
    return rows @ rows.T


def _purify_stacked(
    stacked: Sequence[Tensor], out_dtypes: Sequence[torch.dtype], granularity: str, eps: float
) -> tuple[list[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Purify per-tensor ``[2, ...]`` stacks of (g_task, g_align).

    Returns ``(purified, unit_conflicts, dot_total, task_sq_total, align_sq_total)``
    where the last four are 0-d/1-d tensors kept on-device so that callers that
    do not need statistics never synchronise.
    """
    device = stacked[0].device
    rows = [g.detach().reshape(2, -1) for g in stacked]  # views of contiguous stacks
    acc = _acc_dtype(*rows)
    on_cpu = all(r.device.type == "cpu" for r in rows)
    gram = torch.stack([_gram(r, acc, on_cpu).to(device) for r in rows])  # [n_tensors, 2, 2]
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
    if on_cpu:
        # On the CPU reading the conflict flags and coefficients costs nothing (no
        # device to wait for): a tensor that does not conflict is returned as it
        # is (a view of its stack, never modified), one that does costs one pass.
        for flag, c, g, out_dtype in zip(conflict.tolist(), coef.tolist(), stacked, out_dtypes, strict=True):
            g = g.detach()
            if flag:
                purified.append(g[0].to(acc).add(g[1].to(acc), alpha=-c).to(out_dtype))
            else:
                purified.append(g[0].to(out_dtype))
    else:
        for i, (g, out_dtype) in enumerate(zip(stacked, out_dtypes, strict=True)):
            g = g.detach()
            projected = (g[0].to(acc) - coef[i].to(g.device) * g[1].to(acc)).to(out_dtype)
            purified.append(torch.where(conflict[i].to(g.device), projected, g[0].to(out_dtype)))

    unit_conflicts = conflict if granularity == "tensor" else conflict[:1]
    return purified, unit_conflicts, dot_t.sum(), task_sq_t.sum(), align_sq_t.sum()


def _purify(
    task_grads: Sequence[Tensor | None],
    align_grads: Sequence[Tensor | None],
    granularity: str,
    eps: float,
) -> tuple[list[Tensor], Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`_purify_stacked` of two lists (``None`` statistics for empty input)."""
    _check_granularity(granularity)
    pairs = _pairs(task_grads, align_grads)
    if not pairs:
        return [], None, None, None, None
    acc = _acc_dtype(*(t for pair in pairs for t in pair[:2]))
    stacked, out_dtypes = [], []
    for gt, ga, task_was_none in pairs:
        out_dtypes.append(ga.dtype if task_was_none else gt.dtype)  # before any cast below
        ga = ga.to(gt.device)
        if gt.dtype != ga.dtype:
            gt, ga = gt.to(acc), ga.to(acc)
        stacked.append(torch.stack([gt, ga]))
    return _purify_stacked(stacked, out_dtypes, granularity, eps)


def _stats(conflicts: Tensor, dot: Tensor, tsq: Tensor, asq: Tensor, on_device: bool) -> PurificationStats:
    conflict = conflicts.to(torch.float64).mean()
    # A zero or non-finite norm or dot gives 0/0, x/inf or inf/inf: NaN or 0, reported as 0.
    cosine = (dot / (tsq.sqrt() * asq.sqrt())).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp(-1.0, 1.0)
    if on_device:
        return PurificationStats(conflict=conflict, cosine=cosine)
    conflict_f, cosine_f = torch.stack([conflict, cosine]).tolist()
    return PurificationStats(conflict=conflict_f, cosine=cosine_f)


def purify_stacked_with_stats(
    stacked: Sequence[Tensor], granularity: str = "tensor", eps: float = 1e-12, on_device: bool = False
) -> tuple[list[Tensor], PurificationStats]:
    """:func:`purify_gradients_with_stats` of gradients stacked per parameter.

    ``stacked[i]`` is ``[2, *shape]``: (g_task, g_align) of parameter i, as one
    batched backward pass returns them (``training.both_gradients``); no
    copy of them is made. Non-conflicting gradients may come back as views
    of their stack.
    """
    _check_granularity(granularity)
    if not stacked:
        return [], PurificationStats(conflict=0.0, cosine=0.0)
    for i, g in enumerate(stacked):
        if g is None:
            raise ValueError(f"no gradient at index {i}: neither loss reaches that parameter")
        if g.dim() < 1 or g.shape[0] != 2:
            raise ValueError(f"stacked gradient {i} must have a leading dimension of 2, got {tuple(g.shape)}")
    purified, conflicts, dot, tsq, asq = _purify_stacked(stacked, [g.dtype for g in stacked], granularity, eps)
    return purified, _stats(conflicts, dot, tsq, asq, on_device)


def purify_gradients_with_stats(
    task_grads: Sequence[Tensor | None],
    align_grads: Sequence[Tensor | None],
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
    return purified, _stats(conflicts, dot, tsq, asq, on_device)


def purify_gradients(
    task_grads: Sequence[Tensor | None],
    align_grads: Sequence[Tensor | None],
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
