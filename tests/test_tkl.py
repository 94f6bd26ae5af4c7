"""Tests for fedpurel_app.tkl (docs/METHOD.md "TKL")."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedpurel_app.tkl import (
    aligned_temperatures,
    default_probes,
    entropy,
    solve_temperature,
    temperature_aligned_kl,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LN3 = math.log(3.0)


def _logits(seed: int, b: int, c: int, scale: float, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------- entropy


def test_entropy_hand_value():
    # softmax([0, ln 3]) = [1/4, 3/4]
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3 = 0.5623351446...
    h = entropy(torch.tensor([[0.0, LN3]], dtype=torch.float64))
    assert h.shape == (1,)
    assert h.item() == pytest.approx(math.log(4.0) - 0.75 * LN3, abs=1e-12)
    assert h.item() == pytest.approx(0.5623351446, abs=1e-9)


def test_entropy_uniform_onehot_and_masked():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e4, -1e4, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf]])
    h = entropy(logits)
    assert torch.isfinite(h).all()
    assert h[0].item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)
    assert h[2].item() == pytest.approx(math.log(2.0), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_entropy_half_precision_is_finite_float32(dtype):
    logits = _logits(0, 8, 10, 5.0).to(dtype)
    h = entropy(logits)
    assert h.dtype == torch.float32
    assert torch.isfinite(h).all()
    ref = entropy(logits.double())
    assert torch.allclose(h.double(), ref, atol=1e-4)


# --------------------------------------------------------------------------- solve_temperature


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.sampled_from([1, 3, 17, 64]),
    c=st.integers(2, 30),
    scale=st.floats(0.1, 10.0),
    tau_true=st.floats(0.1, 10.0),
)
def test_solved_temperature_reproduces_target_entropy(seed, b, c, scale, tau_true):
    logits = _logits(seed, b, c, scale)
    target = entropy(logits / tau_true)
    tau = solve_temperature(logits, target, tol=1e-9, max_iter=60)
    assert tau.shape == (b,)
    assert ((tau >= 0.05) & (tau <= 20.0)).all()
    h = entropy(logits / tau.unsqueeze(-1))
    assert torch.allclose(h, target, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.sampled_from([1, 5, 32]), c=st.integers(2, 50))
def test_solve_default_tolerance_float32(seed, b, c):
    logits = _logits(seed, b, c, 3.0, dtype=torch.float32)
    tau_true = torch.rand(b, generator=torch.Generator().manual_seed(seed)) * 5 + 0.2
    target = entropy(logits / tau_true.unsqueeze(-1))
    tau = solve_temperature(logits, target)  # tol 1e-4, float32
    assert tau.dtype == torch.float32
    # tau itself can be ill-conditioned (entropy nearly flat in tau), so compare
    # entropies: |dH/dtau| * tol/2 plus float32 noise stays well below 1e-3 here.
    h = entropy(logits / tau.unsqueeze(-1))
    assert torch.allclose(h, target, atol=1e-3, rtol=0)


def test_solve_float_target_and_clamping():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    # entropy at tau=1 as a plain float target
    h1 = entropy(logits[:1]).item()
    tau = solve_temperature(logits, h1)
    assert torch.allclose(tau, torch.ones(3), atol=1e-3)
    # unreachable targets clamp to the bracket ends
    tau = solve_temperature(logits, torch.tensor([-1.0, 0.0, math.log(3.0) + 1.0]), tau_min=0.05, tau_max=20.0)
    assert tau[0].item() == pytest.approx(0.05)
    assert tau[2].item() == pytest.approx(20.0)
    # target 0 is below H(tau_min) > 0 for these logits (0.05 -> scale 40) ... close to tau_min
    assert tau[1].item() == pytest.approx(0.05, abs=1e-3)


def test_solve_constant_rows_return_one_and_others_unaffected():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([0.3, 2.0, entropy(logits[2:] / 2.5).item()])
    tau = solve_temperature(logits, target)
    assert torch.isfinite(tau).all()
    assert tau[0].item() == 1.0 and tau[1].item() == 1.0
    assert tau[2].item() == pytest.approx(2.5, abs=1e-3)


def test_solve_is_detached_and_no_grad():
    logits = torch.randn(4, 6, requires_grad=True)
    target = entropy(logits)  # carries grad
    tau = solve_temperature(logits, target)
    assert not tau.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_solve_extreme_logits_finite(device):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], device=device)
    tau = solve_temperature(logits, torch.tensor([0.5, 0.5, 0.5], device=device))
    assert tau.device.type == device
    assert torch.isfinite(tau).all()
    assert ((tau >= 0.05) & (tau <= 20.0)).all()


def test_solve_nan_target_is_finite():
    tau = solve_temperature(torch.tensor([[0.0, 1.0]]), torch.tensor([float("nan")]))
    assert torch.isfinite(tau).all()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(2, 40),
    scale=st.floats(0.1, 10.0),
    points=st.sampled_from([2, 3, 7, 15, 63]),
)
@example(seed=505, c=2, scale=0.25, points=2)
def test_probes_per_round_find_the_bisection_answer(seed, c, scale, points):
    # Both brackets contain the crossing and end narrower than tol, so each answer is
    # within tol of the crossing and the two within 2 tol of each other (seed 505, 2
    # classes, scale 0.25, 2 probes: 1.95e-9 apart); each reproduces the target entropy.
    logits = _logits(seed, 8, c, scale)
    tau_true = torch.rand(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5 + 0.1
    target = entropy(logits / tau_true.unsqueeze(-1))
    bisection = solve_temperature(logits, target, tol=1e-9, max_iter=60, points=1)
    probed = solve_temperature(logits, target, tol=1e-9, max_iter=60, points=points)
    assert (probed - bisection).abs().max() <= 2e-9
    assert torch.allclose(entropy(logits / probed.unsqueeze(-1)), target, atol=1e-6)


def test_rounds_and_max_iter_count_halvings():
    logits = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float64)
    target = entropy(logits / 2.0)
    # max_iter=0: no round, the bracket midpoint
    assert solve_temperature(logits, target, max_iter=0, points=7).item() == pytest.approx((0.05 + 20.0) / 2)
    # 3 halvings = one round of 7 probes: width (20 - 0.05) / 8, tau within half of it
    one_round = solve_temperature(logits, target, max_iter=3, points=7).item()
    assert abs(one_round - 2.0) <= (20.0 - 0.05) / 16
    assert abs(one_round - 2.0) > 1e-3  # and no further
    with pytest.raises(ValueError, match="points"):
        solve_temperature(logits, target, points=0)


def test_default_probes_depend_on_classes_and_device_only():
    assert [default_probes(c) for c in (2, 5, 10, 20, 50, 1000)] == [63, 15, 7, 7, 1, 1]
    assert [default_probes(c, "cuda") for c in (20, 100, 1000, 5000)] == [63, 31, 3, 1]
    # a row's temperature is the same alone and inside any batch
    logits = _logits(3, 33, 20, 4.0, dtype=torch.float32)
    target = entropy(logits / 1.7)
    batch = solve_temperature(logits, target)
    alone = torch.stack([solve_temperature(logits[i : i + 1], target[i : i + 1])[0] for i in range(33)])
    assert torch.equal(batch, alone)


def test_minus_inf_logits_count_as_absent_classes():
    row = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    with_inf = torch.tensor([[0.5, -1.0, 2.0, 0.0, -math.inf, -math.inf]])
    target = torch.tensor([0.9])
    assert torch.allclose(solve_temperature(with_inf, target), solve_temperature(row, target), atol=1e-6)


# --------------------------------------------------------------------------- aligned temperatures


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.sampled_from([1, 4, 33]),
    c=st.integers(2, 40),
    sf=st.floats(0.3, 6.0),
    sz=st.floats(0.3, 6.0),
)
def test_aligned_entropies_match(seed, b, c, sf, sz):
    f = _logits(seed, b, c, sf)
    z = _logits(seed + 1, b, c, sz)
    tau_f, tau_z = aligned_temperatures(f, z, tol=1e-9, max_iter=60)
    h_star = 0.5 * (entropy(f) + entropy(z))
    hf = entropy(f / tau_f.unsqueeze(-1))
    hz = entropy(z / tau_z.unsqueeze(-1))

    # H* is reachable for a row iff H(x/0.05) <= H* <= H(x/20); an (almost)
    # constant row can stay above H* even at tau_min: then tau clamps to 0.05.
    def reachable(x):
        return (entropy(x / 0.05) <= h_star) & (h_star <= entropy(x / 20.0))

    ok = reachable(f) & reachable(z)
    assert torch.allclose(hf[ok], h_star[ok], atol=1e-6)
    assert torch.allclose(hz[ok], h_star[ok], atol=1e-6)
    assert torch.allclose(hf[ok], hz[ok], atol=2e-6)
    for x, tau in ((f, tau_f), (z, tau_z)):
        low = entropy(x / 0.05) > h_star
        high = entropy(x / 20.0) < h_star
        assert torch.all(tau[low & ~high] == 0.05)
        assert torch.all(tau[high & ~low] == 20.0)
    # with these scales the overwhelming majority of rows are reachable
    if b >= 33:
        assert ok.float().mean() >= 0.5


def test_aligned_temperatures_detached():
    f = torch.randn(3, 5, requires_grad=True)
    z = torch.randn(3, 5, requires_grad=True)
    tau_f, tau_z = aligned_temperatures(f, z)
    assert not tau_f.requires_grad and not tau_z.requires_grad
    assert tau_f.shape == (3,) and tau_z.shape == (3,)


# --------------------------------------------------------------------------- TKL loss


def test_plain_kl_hand_value():
    # teacher z = [0, ln 3] -> p = [1/4, 3/4]; student f = [0, 0] -> q = [1/2, 1/2]
    # KL(p||q) = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308120...
    z = torch.tensor([[0.0, LN3]], dtype=torch.float64)
    f = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    loss = temperature_aligned_kl(f, z, aligned=False)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.1308120, abs=1e-6)


def test_tkl_hand_value_equal_entropies():
    # z = [0, ln 3] -> p = [1/4, 3/4]; f = [ln 3, 0] -> q = [3/4, 1/4].
    # Equal entropies, so H* = H(p) = H(q) and tau_f = tau_z = 1:
    # KL = 1/4 ln((1/4)/(3/4)) + 3/4 ln((3/4)/(1/4)) = (1/2) ln 3 = 0.5493061...
    z = torch.tensor([[0.0, LN3]], dtype=torch.float64)
    f = torch.tensor([[LN3, 0.0]], dtype=torch.float64)
    tau_f, tau_z = aligned_temperatures(f, z)
    assert tau_f.item() == pytest.approx(1.0, abs=1e-4)
    assert tau_z.item() == pytest.approx(1.0, abs=1e-4)
    loss = temperature_aligned_kl(f, z, tol=1e-10, max_iter=60)
    assert loss.item() == pytest.approx(0.5 * LN3, abs=1e-6)


def test_tkl_batch_mean_of_rows():
    z = torch.tensor([[0.0, LN3], [0.0, LN3]], dtype=torch.float64)
    f = torch.tensor([[0.0, 0.0], [0.0, LN3]], dtype=torch.float64)
    # row 0: 0.1308..., row 1: identical distributions -> 0; mean = 0.0654...
    loss = temperature_aligned_kl(f, z, aligned=False)
    assert loss.item() == pytest.approx(0.5 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5)), abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.integers(2, 20), k=st.floats(0.2, 5.0))
def test_tkl_zero_for_scaled_teacher(seed, c, k):
    # f = k * z: temperature alignment removes the confidence difference -> TKL ~ 0,
    # while plain KL is > 0 unless k == 1.
    z = _logits(seed, 6, c, 2.0)
    f = k * z
    loss = temperature_aligned_kl(f, z, tol=1e-10, max_iter=60)
    assert abs(loss.item()) < 1e-6


def test_tkl_differs_from_kl_when_confidence_differs():
    z = _logits(1, 8, 10, 2.0)
    f = 3.0 * z
    assert temperature_aligned_kl(f, z, aligned=False).item() > 1e-2
    assert temperature_aligned_kl(f, z, aligned=True).item() < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tkl_equals_plain_kl_when_not_aligned(seed):
    f = _logits(seed, 5, 7, 2.0)
    z = _logits(seed + 10, 5, 7, 2.0)
    p = torch.softmax(z, -1)
    q = torch.softmax(f, -1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    assert temperature_aligned_kl(f, z, aligned=False).item() == pytest.approx(ref.item(), abs=1e-12)
    ref_torch = torch.nn.functional.kl_div(
        torch.log_softmax(f, -1), torch.log_softmax(z, -1), log_target=True, reduction="batchmean"
    )
    assert temperature_aligned_kl(f, z, aligned=False).item() == pytest.approx(ref_torch.item(), abs=1e-12)


@pytest.mark.parametrize("aligned", [True, False])
def test_gradient_flows_to_student_only(aligned):
    f = _logits(3, 4, 6, 2.0).requires_grad_(True)
    z = _logits(4, 4, 6, 2.0).requires_grad_(True)
    loss = temperature_aligned_kl(f, z, aligned=aligned)
    loss.backward()
    assert z.grad is None
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_gradient_treats_temperatures_as_constants():
    # With detached tau: dL/df_bc = (q_bc - p_bc) / (tau_f,b * B)
    f = _logits(5, 3, 4, 2.0).requires_grad_(True)
    z = _logits(6, 3, 4, 2.0)
    tau_f, tau_z = aligned_temperatures(f, z)
    loss = temperature_aligned_kl(f, z)
    (grad,) = torch.autograd.grad(loss, f)
    p = torch.softmax(z / tau_z[:, None], -1)
    q = torch.softmax(f.detach() / tau_f[:, None], -1)
    expected = (q - p) / tau_f[:, None] / f.shape[0]
    assert torch.allclose(grad, expected, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [True, False])
def test_extreme_and_constant_logits_finite(device, aligned):
    f = torch.tensor(
        [[1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [-1e4, 1e4, 1e4], [1.0, 2.0, 3.0]], device=device, requires_grad=True
    )
    z = torch.tensor([[-1e4, 1e4, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, 2.0, 1.0]], device=device)
    loss = temperature_aligned_kl(f, z, aligned=aligned)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(f.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aligned", [True, False])
def test_half_precision_inputs(dtype, aligned):
    f32 = _logits(7, 6, 10, 4.0, dtype=torch.float32)
    z32 = _logits(8, 6, 10, 4.0, dtype=torch.float32)
    f = f32.to(dtype).requires_grad_(True)
    z = z32.to(dtype)
    loss = temperature_aligned_kl(f, z, aligned=aligned)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert f.grad.dtype == dtype
    assert torch.isfinite(f.grad.float()).all()
    ref = temperature_aligned_kl(f.detach().float(), z.float(), aligned=aligned)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    # extreme half logits
    fx = torch.tensor([[1e4, -1e4, 0.0]], dtype=dtype, requires_grad=True)
    zx = torch.tensor([[0.0, 1.0, 2.0]], dtype=dtype)
    lx = temperature_aligned_kl(fx, zx, aligned=aligned)
    lx.backward()
    assert torch.isfinite(lx) and torch.isfinite(fx.grad.float()).all()


def test_empty_batch_and_shape_mismatch():
    loss = temperature_aligned_kl(torch.zeros(0, 5), torch.zeros(0, 5))
    assert loss.item() == 0.0
    with pytest.raises(ValueError):
        temperature_aligned_kl(torch.zeros(2, 5), torch.zeros(2, 4))


def test_confidence_gap_by_hand():
    """z uniform over 2 classes, f = [ln 3, 0] (p = 3/4, 1/4): the student is the more confident."""
    from fedpurel_app.tkl import confidence_gap

    z = torch.zeros(1, 2)
    f = torch.tensor([[math.log(3.0), 0.0]])
    gap = confidence_gap(f, z)
    h_f = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert gap["entropy"] == pytest.approx(h_f, abs=1e-6)
    assert gap["zero_shot_entropy"] == pytest.approx(math.log(2.0), abs=1e-6)
    # KL(u || p) = 1/2 (ln 1/2 - ln 3/4) + 1/2 (ln 1/2 - ln 1/4)
    assert gap["kl_to_zero_shot"] == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2.0), abs=1e-6)
    # Aligned: the uniform teacher keeps tau_z = 1; tau_f brings H(f / tau_f) to (H(f) + ln 2) / 2.
    target = 0.5 * (h_f + math.log(2.0))
    lo, hi = 1.0, 20.0  # H(softmax(f / tau)) grows with tau: bisect by hand
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        q = 1.0 / (1.0 + 3.0 ** (-1.0 / mid))
        lo, hi = (mid, hi) if -(q * math.log(q) + (1 - q) * math.log(1 - q)) < target else (lo, mid)
    q = 1.0 / (1.0 + 3.0 ** (-1.0 / lo))
    assert gap["tau_ratio"] == pytest.approx(lo, rel=1e-3)
    assert gap["tkl_to_zero_shot"] == pytest.approx(0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)), abs=1e-4)
    assert 0 < gap["tkl_to_zero_shot"] < gap["kl_to_zero_shot"]


def test_confidence_gap_of_identical_logits_is_none():
    from fedpurel_app.tkl import confidence_gap

    logits = torch.randn(8, 5) * 3
    gap = confidence_gap(logits, logits.clone())
    assert gap["kl_to_zero_shot"] == pytest.approx(0.0, abs=1e-6)
    assert gap["tkl_to_zero_shot"] == pytest.approx(0.0, abs=1e-5)
    assert gap["tau_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert gap["entropy"] == pytest.approx(gap["zero_shot_entropy"])


def test_confidence_gap_tkl_is_temperature_aligned_kl_bitwise():
    """One temperature solve serves both the ratio and the TKL: the same value as the loss's own."""
    from fedpurel_app.tkl import confidence_gap

    g = torch.Generator().manual_seed(0)
    f, z = torch.randn(64, 20, generator=g) * 5, torch.randn(64, 20, generator=g) * 3
    assert confidence_gap(f, z)["tkl_to_zero_shot"] == float(temperature_aligned_kl(f, z))
