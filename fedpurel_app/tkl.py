"""Temperature-aligned KL divergence (TKL), docs/METHOD.md "TKL".

The alignment loss of Stage 1 keeps the global model (phi_g) close to the
zero-shot CLIP teacher without forcing it to copy the teacher's confidence:

* ``H(p) = -sum_c p_c log p_c`` (natural log), evaluated at T = 1 on the
  student logits ``f`` and the zero-shot logits ``z``;
* per-sample target entropy ``H* = (H(softmax(f)) + H(softmax(z))) / 2``;
* per-sample temperatures ``tau_f``, ``tau_z`` with
  ``H(softmax(f / tau_f)) = H*`` and ``H(softmax(z / tau_z)) = H*``, found by
  a batched bracket search (bisection, or several probes per round; entropy
  is non-decreasing in tau) and detached;
* ``L_align = mean_b KL(softmax(z / tau_z) || softmax(f / tau_f))`` with
  probabilities clamped at 1e-12, teacher || student, no ``T^2`` factor.

The ablation "kl" is the same loss with ``tau_f = tau_z = 1``.

Dtype policy: every computation runs in ``float32`` when the inputs are
``float16``/``bfloat16`` (and in ``float64`` for ``float64`` inputs); results
are returned in that computation dtype (i.e. never in half precision).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PROB_CLAMP",
    "FLAT_TAU",
    "entropy",
    "default_probes",
    "solve_temperature",
    "aligned_temperatures",
    "temperature_aligned_kl",
]

#: Lower clamp applied to probabilities inside the KL (docs/METHOD.md "TKL": 1e-12).
PROB_CLAMP: float = 1e-12
_LOG_PROB_CLAMP: float = math.log(PROB_CLAMP)

#: Temperature returned for rows whose entropy is flat over the bracket
#: (e.g. all logits equal): any tau gives the same distribution, so we return
#: the neutral temperature 1.0.
FLAT_TAU: float = 1.0

#: A row counts as "flat" when H(tau_max) - H(tau_min) is at most this.
_FLAT_ENTROPY_SPAN: float = 1e-6


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/integer inputs, the input dtype otherwise."""
    if t.dtype in (torch.float32, torch.float64):
        return t.dtype
    return torch.float32


def entropy(logits: Tensor) -> Tensor:
    """Per-row Shannon entropy of ``softmax(logits)`` over the last dim.

    ``H(p) = -sum_c p_c log p_c`` with the natural log (docs/METHOD.md "TKL").
    Terms with ``p_c = 0`` (e.g. ``-inf`` logits) contribute 0.

    Args:
        logits: ``[..., C]`` tensor (typically ``[B, C]``).

    Returns:
        ``[...]`` entropies (``[B]`` for ``[B, C]`` input), in float32 for
        half-precision input. Differentiable.
    """
    x = logits.to(_compute_dtype(logits))
    logp = F.log_softmax(x, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(dim=-1)


#: Logits below this are raised to it inside the temperature solve: a -inf logit
#: (probability 0) then gives p log p = 0 * finite = 0 instead of NaN, with no
#: select per probe; finite after division by any tau in the bracket.
_LOGIT_FLOOR: float = -1e30

#: Probes per round of :func:`solve_temperature` (see :func:`default_probes`):
#: at most this many probes times classes per row.
_PROBE_BUDGET = {"cpu": 140, "other": 4096}
_MAX_PROBES: int = 63


def default_probes(num_classes: int, device: torch.device | str = "cpu") -> int:
    """Probes per search round of :func:`solve_temperature` for ``C`` classes on ``device``.

    ``K = 2**n - 1``, the largest with ``K <= budget // C`` (at least 1, at most
    63), so that each round cuts the bracket by a whole number of halvings; the
    budget is 140 probe-classes per row on the CPU and 4,096 on an accelerator.
    A function of ``C`` and the device type alone: a row's temperature does not
    depend on the batch it is solved in. Fewer, larger rounds mean fewer
    kernel launches, what a step of a small model is bound by; on the CPU a
    probe also costs real arithmetic, hence the smaller budget (measured:
    ``K = 7`` solves 32 x 20 logits 1.6x faster than bisection, and
    bisection stays fastest from ~50 classes).
    """
    budget = _PROBE_BUDGET["cpu" if torch.device(device).type == "cpu" else "other"]
    per_row = budget // max(1, num_classes)
    return max(1, min(_MAX_PROBES, 2 ** int(math.log2(per_row + 1)) - 1))


def solve_temperature(
    logits: Tensor,
    target_entropy: Tensor | float,
    tau_min: float = 0.05,
    tau_max: float = 20.0,
    tol: float = 1e-4,
    max_iter: int = 50,
    points: int | None = None,
) -> Tensor:
    """Per-row tau in ``[tau_min, tau_max]`` with ``H(softmax(logits / tau)) = target``.

    Batched bracket search over all rows at once (docs/METHOD.md "TKL";
    the reference bisects tau in [0.05, 20]). Entropy is non-decreasing in
    tau. Each round evaluates the entropy at ``K = points`` evenly spaced
    interior probes ``lo + j w`` (``j = 1..K``) of every row's bracket
    ``[lo, lo + (K + 1) w]`` in one batched pass, and keeps the sub-interval
    ``[lo + m w, lo + (m + 1) w]`` where ``m`` counts the probes with
    ``H < target``: the bracket shrinks ``K + 1``-fold per round, and
    ``K = 1`` is bisection. The answer is the bracket midpoint. All rows share
    the bracket width, so the search runs a fixed number of rounds without a
    device synchronisation: until the width is below ``tol``, or below
    ``(tau_max - tau_min) / 2**max_iter``, whichever comes first. Any ``K``
    gives the crossing to within half the final width.

    Edge cases:
      * target <= H(tau_min): tau = tau_min; target >= H(tau_max): tau = tau_max
        (unreachable targets clamp to the bracket end);
      * rows whose entropy is flat over the bracket
        (``H(tau_max) - H(tau_min) <= 1e-6``, e.g. all logits equal, or logits
        so extreme that the row is one-hot at every tau in the bracket) get
        ``tau = FLAT_TAU = 1.0``;
      * NaN targets are treated as unreachable from below (tau = tau_min).

    Args:
        logits: ``[..., C]`` logits (``[B, C]`` typically).
        target_entropy: float or tensor broadcastable to ``logits.shape[:-1]``.
        tau_min, tau_max: bracket, ``0 < tau_min < tau_max``.
        tol: bracket width at which the search stops.
        max_iter: the most halvings of the bracket (bisection steps); with
            ``K`` probes a round counts ``log2(K + 1)`` of them and the last
            round is whole, so it may go up to that many halvings further.
        points: probes per round, ``K >= 1``; default :func:`default_probes`.

    Returns:
        Detached ``[...]`` temperatures (float32 for half-precision input).
    """
    if not (0.0 < tau_min < tau_max) or not math.isfinite(tau_max):
        raise ValueError(f"need 0 < tau_min < tau_max < inf, got tau_min={tau_min}, tau_max={tau_max}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    k = default_probes(logits.shape[-1], logits.device) if points is None else int(points)
    if k < 1:
        raise ValueError(f"points must be >= 1, got {points}")

    with torch.no_grad():
        dtype = _compute_dtype(logits)
        x = logits.detach().to(dtype).clamp_min(_LOGIT_FLOOR).unsqueeze(-2)  # [..., 1, C]
        batch_shape = x.shape[:-2]
        target = torch.as_tensor(target_entropy, dtype=dtype, device=x.device)
        target = torch.broadcast_to(target, batch_shape)
        # A NaN target would make every comparison False; route it to tau_min.
        target = torch.nan_to_num(target, nan=-math.inf)
        neg_target = (-target).unsqueeze(-1)

        def neg_h(tau: Tensor) -> Tensor:
            # -H(softmax(x / tau)) = sum_c p_c log p_c for probes tau [..., P] -> [..., P]
            # (entropy() with the p = 0 select made unnecessary by the logit floor).
            logp = F.log_softmax(x / tau.unsqueeze(-1), dim=-1)
            return (logp.exp() * logp).sum(dim=-1)

        ends = torch.tensor([tau_min, tau_max], dtype=dtype, device=x.device)
        h_lo, h_hi = (-neg_h(ends.expand(*batch_shape, 2))).unbind(-1)

        width = tau_max - tau_min
        halvings = 0 if width < tol else min(max_iter, math.ceil(math.log2(width / tol)))
        rounds = math.ceil(halvings / math.log2(k + 1) - 1e-9)
        lo = torch.full((*batch_shape, 1), tau_min, dtype=dtype, device=x.device)
        probes = torch.arange(1, k + 1, dtype=dtype, device=x.device)
        for _ in range(rounds):
            width = width / (k + 1)
            below = neg_h(lo + width * probes) > neg_target  # H(lo + j w) < target, j = 1..K
            lo = lo.add(below.sum(dim=-1, keepdim=True), alpha=width)
        tau = (lo + 0.5 * width).squeeze(-1)

        tau = torch.where(target <= h_lo, tau_min, tau)
        tau = torch.where(target >= h_hi, tau_max, tau)
        flat = (h_hi - h_lo).abs() <= _FLAT_ENTROPY_SPAN
        tau = torch.where(flat, FLAT_TAU, tau)
        # Non-finite logits can make h_lo/h_hi NaN; never return NaN.
        tau = torch.nan_to_num(tau, nan=FLAT_TAU).clamp(tau_min, tau_max)
    return tau.detach()


def aligned_temperatures(student_logits: Tensor, teacher_logits: Tensor, **solve_kwargs: Any) -> tuple[Tensor, Tensor]:
    """Per-sample temperatures that equalise student and teacher entropies.

    ``H* = (H(softmax(f)) + H(softmax(z))) / 2`` per row, then
    ``tau_f = solve_temperature(f, H*)`` and ``tau_z = solve_temperature(z, H*)``
    (docs/METHOD.md "TKL"). No gradient flows through the solve.

    Args:
        student_logits: ``f``, ``[B, C]`` logits of the model with phi_g.
        teacher_logits: ``z``, ``[B, C]`` zero-shot logits.
        **solve_kwargs: forwarded to :func:`solve_temperature`
            (``tau_min``, ``tau_max``, ``tol``, ``max_iter``).

    Returns:
        ``(tau_f, tau_z)``, each detached ``[B]``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    with torch.no_grad():
        f = student_logits.detach()
        z = teacher_logits.detach().to(device=f.device)
        h_star = 0.5 * (entropy(f) + entropy(z).to(_compute_dtype(f)))
        if _compute_dtype(f) == _compute_dtype(z) and f.dim() >= 2:
            # One search over the stacked rows of f and z: rows are solved
            # independently, so the temperatures are exactly those of two
            # separate solves, at half the number of (tiny) kernel launches.
            dtype = _compute_dtype(f)
            both = torch.cat([f.to(dtype), z.to(dtype)], dim=0)
            target = torch.broadcast_to(h_star, f.shape[:-1])
            tau = solve_temperature(both, torch.cat([target, target], dim=0), **solve_kwargs)
            n = f.shape[0]
            return tau[:n], tau[n:]
        tau_f = solve_temperature(f, h_star, **solve_kwargs)
        tau_z = solve_temperature(z, h_star, **solve_kwargs)
    return tau_f, tau_z


def temperature_aligned_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    aligned: bool = True,
    **solve_kwargs: Any,
) -> Tensor:
    """TKL alignment loss ``L_align`` (docs/METHOD.md "TKL").

    ``L = mean_b sum_c p_c (log p_c - log q_c)`` with
    ``p = softmax(z / tau_z)`` (teacher, detached) and
    ``q = softmax(f / tau_f)`` (student), both clamped at 1e-12 (implemented
    as ``log p = max(log_softmax, log 1e-12)``, ``p = exp(log p)``, which is
    identical to clamping the probabilities). No ``T^2`` factor.

    Args:
        student_logits: ``f``, ``[B, C]``; the only input that receives gradient.
        teacher_logits: ``z``, ``[B, C]`` zero-shot logits (detached here).
        aligned: ``True`` for TKL (per-sample entropy-aligned temperatures);
            ``False`` for the "kl" ablation (``tau_f = tau_z = 1``).
        **solve_kwargs: forwarded to :func:`solve_temperature`.

    Returns:
        Scalar loss (float32 for half-precision input), finite.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = _compute_dtype(student_logits)
    f = student_logits.to(dtype)
    z = teacher_logits.detach().to(device=f.device, dtype=dtype)
    if aligned:
        tau_f, tau_z = aligned_temperatures(f.detach(), z, **solve_kwargs)
        f = f / tau_f.to(dtype).unsqueeze(-1)
        z = z / tau_z.to(dtype).unsqueeze(-1)
    log_p = F.log_softmax(z, dim=-1).clamp_min(_LOG_PROB_CLAMP)
    log_q = F.log_softmax(f, dim=-1).clamp_min(_LOG_PROB_CLAMP)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(dim=-1)
    if kl.numel() == 0:
        return kl.sum()
    return kl.mean()


def confidence_gap(student_logits: Tensor, teacher_logits: Tensor, **solve_kwargs: Any) -> dict[str, float]:
    """How far the student's confidence is from the teacher's, and what TKL's alignment removes
    (docs/METHOD.md "TKL"; the README's check of TKL against KL reads it).

    - ``entropy``, ``zero_shot_entropy``: ``mean_b H(softmax(f_b))`` and ``mean_b H(softmax(z_b))``;
    - ``kl_to_zero_shot``: plain ``mean_b KL(softmax(z_b) || softmax(f_b))`` (the ``fedpurel-kl`` loss);
    - ``tkl_to_zero_shot``: the same after the alignment (:func:`temperature_aligned_kl`);
    - ``tau_ratio``: the median over rows of ``tau_f / tau_z`` (:func:`aligned_temperatures`):
      1 when the two are equally confident, above 1 when the student is the more confident.

    The part of KL that is a confidence gap is ``kl - tkl``: with no gap the two are equal.
    """
    tau_f, tau_z = aligned_temperatures(student_logits, teacher_logits, **solve_kwargs)
    with torch.no_grad():
        f, z = student_logits.float(), teacher_logits.float().to(student_logits.device)
        return {
            "entropy": float(entropy(f).mean()),
            "zero_shot_entropy": float(entropy(z).mean()),
            "kl_to_zero_shot": float(temperature_aligned_kl(f, z, aligned=False)),
            # TKL with the temperatures solved once above (temperature_aligned_kl would solve them again)
            "tkl_to_zero_shot": float(
                temperature_aligned_kl(f / tau_f.unsqueeze(-1), z / tau_z.to(f.device).unsqueeze(-1), aligned=False)
            ),
            "tau_ratio": float((tau_f / tau_z).median()),
        }
