"""Tests for fedpurel_app.purification (docs/METHOD.md "Purification")."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpurel_app.purification import (
    PurificationStats,
    purify_gradients,
    purify_gradients_with_stats,
    purify_stacked_with_stats,
)

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def test_2d_conflict_hand_example():
    # g_task = [1, 0], g_align = [-1, 1]
    # <g_task, g_align> = -1 < 0, ||g_align||^2 = 2
    # g = [1, 0] - (-1 / 2) * [-1, 1] = [1, 0] + [-0.5, 0.5] = [0.5, 0.5]
    # <g, g_align> = -0.5 + 0.5 = 0
    (g,) = purify_gradients([T(1.0, 0.0)], [T(-1.0, 1.0)])
    assert torch.allclose(g, T(0.5, 0.5), atol=1e-12)
    assert torch.dot(g, T(-1.0, 1.0)).item() == pytest.approx(0.0, abs=1e-12)


def test_no_conflict_returns_task_exactly():
    gt, ga = T(1.0, 2.0), T(1.0, 0.0)  # dot = 1 >= 0
    (g,) = purify_gradients([gt], [ga])
    assert torch.equal(g, gt)
    # orthogonal (dot = 0) is not a conflict either
    (g,) = purify_gradients([T(0.0, 3.0)], [T(5.0, 0.0)])
    assert torch.equal(g, T(0.0, 3.0))


def test_flat_vs_tensor_differ_crafted():
    # tensor 1: g_task = [1, 0], g_align = [-2, 0]  (dot -2, ||a||^2 4)
    # tensor 2: g_task = [0, 1], g_align = [0, 1]   (dot +1, ||a||^2 1)
    # "tensor": t1 -> [1,0] - (-2/4)[-2,0] = [0, 0]; t2 unchanged [0, 1]
    # "flat": dot = -1, ||a||^2 = 5, coef = -1/5 -> g = g_task + 0.2 g_align
    #         t1 -> [0.6, 0], t2 -> [0, 1.2]; flat <g, a> = -1.2 + 1.2 = 0
    task = [T(1.0, 0.0), T(0.0, 1.0)]
    align = [T(-2.0, 0.0), T(0.0, 1.0)]
    g_tensor, s_tensor = purify_gradients_with_stats(task, align, granularity="tensor")
    g_flat, s_flat = purify_gradients_with_stats(task, align, granularity="flat")
    assert torch.allclose(g_tensor[0], T(0.0, 0.0), atol=1e-12)
    assert torch.equal(g_tensor[1], T(0.0, 1.0))
    assert torch.allclose(g_flat[0], T(0.6, 0.0), atol=1e-12)
    assert torch.allclose(g_flat[1], T(0.0, 1.2), atol=1e-12)
    assert s_tensor.conflict == pytest.approx(0.5)
    assert s_flat.conflict == pytest.approx(1.0)
    # cosine over full flattened gradients: -1 / (sqrt(2) * sqrt(5))
    expected_cos = -1.0 / (math.sqrt(2.0) * math.sqrt(5.0))
    assert s_tensor.cosine == pytest.approx(expected_cos, abs=1e-12)
    assert s_flat.cosine == pytest.approx(expected_cos, abs=1e-12)


def test_flat_no_conflict_when_tensor_conflicts():
    # t1 conflicts (dot -1) but overall dot = -1 + 4 = 3 >= 0
    task = [T(1.0), T(2.0)]
    align = [T(-1.0), T(2.0)]
    g_flat = purify_gradients(task, align, granularity="flat")
    g_tensor = purify_gradients(task, align, granularity="tensor")
    assert torch.equal(g_flat[0], T(1.0)) and torch.equal(g_flat[1], T(2.0))
    assert torch.allclose(g_tensor[0], T(0.0)) and torch.equal(g_tensor[1], T(2.0))


grad_lists = st.integers(0, 100_000).flatmap(
    lambda seed: st.lists(st.integers(1, 12), min_size=1, max_size=6).map(lambda sizes: (seed, sizes))
)


@settings(max_examples=60, deadline=None)
@given(data=grad_lists, granularity=st.sampled_from(["tensor", "flat"]), scale=st.floats(1e-3, 1e3))
def test_property_no_residual_conflict(data, granularity, scale):
    seed, sizes = data
    g = torch.Generator().manual_seed(seed)
    task = [torch.randn(n, generator=g, dtype=torch.float64) * scale for n in sizes]
    align = [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]
    task_copy = [t.clone() for t in task]
    out, stats = purify_gradients_with_stats(task, align, granularity=granularity)
    assert [t.shape for t in out] == [t.shape for t in task]
    # inputs untouched
    assert all(torch.equal(a, b) for a, b in zip(task, task_copy, strict=True))
    if granularity == "tensor":
        units = [([gt], [ga], [o]) for gt, ga, o in zip(task, align, out, strict=True)]
    else:
        units = [(task, align, out)]
    n_conflict = 0
    for gts, gas, outs in units:
        dot_before = sum(torch.dot(a, b) for a, b in zip(gts, gas, strict=True))
        dot_after = sum(torch.dot(a, b) for a, b in zip(outs, gas, strict=True))
        if dot_before < 0:
            n_conflict += 1
            assert dot_after >= -1e-6
        else:
            assert all(torch.equal(o, t) for o, t in zip(outs, gts, strict=True))
    assert stats.conflict == pytest.approx(n_conflict / len(units))
    ft, fa = torch.cat(task), torch.cat(align)
    assert stats.cosine == pytest.approx((torch.dot(ft, fa) / (ft.norm() * fa.norm())).item(), abs=1e-9)
    assert -1.0 <= stats.cosine <= 1.0
    # purify_gradients gives the same result as the stats variant
    out2 = purify_gradients(task, align, granularity=granularity)
    assert all(torch.equal(a, b) for a, b in zip(out, out2, strict=True))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), granularity=st.sampled_from(["tensor", "flat"]))
def test_property_float32_relative(seed, granularity):
    g = torch.Generator().manual_seed(seed)
    task = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g)]
    align = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g)]
    out = purify_gradients(task, align, granularity=granularity)
    for o, t in zip(out, task, strict=True):
        assert o.dtype == torch.float32 and o.shape == t.shape
    if granularity == "flat":
        fo, fa = torch.cat([o.flatten() for o in out]), torch.cat([a.flatten() for a in align])
        ft = torch.cat([t.flatten() for t in task])
        assert torch.dot(fo, fa) >= -1e-5 * ft.norm() * fa.norm()


def test_zero_align_gradient_is_finite_and_identity():
    gt = [torch.randn(3, 3), torch.randn(2)]
    ga = [torch.zeros(3, 3), torch.zeros(2)]
    for gran in ("tensor", "flat"):
        out, stats = purify_gradients_with_stats(gt, ga, granularity=gran)
        assert all(torch.equal(o, t) for o, t in zip(out, gt, strict=True))
        assert stats == PurificationStats(conflict=0.0, cosine=0.0)


def test_zero_task_gradient():
    out, stats = purify_gradients_with_stats([torch.zeros(4)], [torch.randn(4)])
    assert torch.equal(out[0], torch.zeros(4))
    assert stats.cosine == 0.0 and stats.conflict == 0.0


def test_tiny_align_gradient_finite():
    gt = [torch.tensor([1.0, 0.0])]
    ga = [torch.tensor([-1e-30, 1e-30])]
    out = purify_gradients(gt, ga)
    assert torch.isfinite(out[0]).all()


def test_none_handling():
    ga = torch.tensor([1.0, -2.0])
    gt = torch.tensor([3.0, 1.0])
    out = purify_gradients([None, gt], [ga, None])
    assert torch.equal(out[0], torch.zeros_like(ga))
    assert torch.equal(out[1], gt)
    with pytest.raises(ValueError, match="None"):
        purify_gradients([None], [None])


def test_validation_errors():
    with pytest.raises(ValueError, match="shape"):
        purify_gradients([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="length"):
        purify_gradients([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError) as exc:
        purify_gradients([torch.zeros(2)], [torch.zeros(2)], granularity="layer")
    assert "tensor" in str(exc.value) and "flat" in str(exc.value)


def test_empty_input():
    out, stats = purify_gradients_with_stats([], [])
    assert out == [] and stats == PurificationStats(0.0, 0.0)


def test_stats_is_frozen_dataclass():
    _, stats = purify_gradients_with_stats([T(1.0)], [T(-1.0)])
    assert isinstance(stats.conflict, float) and isinstance(stats.cosine, float)
    assert stats.cosine == pytest.approx(-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.conflict = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["tensor", "flat"])
def test_half_precision_and_extreme(dtype, granularity):
    gt = [torch.tensor([1e4, -1e4, 3.0], dtype=dtype), torch.tensor([[1.0, 2.0]], dtype=dtype)]
    ga = [torch.tensor([-1e4, 1e4, 0.0], dtype=dtype), torch.tensor([[0.0, 0.0]], dtype=dtype)]
    out, stats = purify_gradients_with_stats(gt, ga, granularity=granularity)
    for o in out:
        assert o.dtype == dtype
        assert torch.isfinite(o.float()).all()
    assert math.isfinite(stats.cosine) and math.isfinite(stats.conflict)
    # first tensor: g_task is (almost) anti-parallel to g_align -> purified to ~[0, 0, 3]
    if granularity == "tensor":
        assert torch.allclose(out[0].float(), torch.tensor([0.0, 0.0, 3.0]), atol=1e-2)


@pytest.mark.parametrize("task_dtype", [torch.float16, torch.bfloat16])
def test_mixed_dtypes_return_the_task_gradients_dtype(task_dtype):
    gt = [torch.tensor([1.0, 0.0], dtype=task_dtype), torch.tensor([2.0], dtype=task_dtype)]
    ga = [torch.tensor([-1.0, 1.0]), torch.tensor([1.0])]  # float32
    out = purify_gradients(gt, ga)
    assert [o.dtype for o in out] == [task_dtype, task_dtype]
    assert torch.allclose(out[0].float(), torch.tensor([0.5, 0.5]), atol=1e-2)
    assert torch.equal(out[1], gt[1])


@pytest.mark.parametrize("granularity", ["tensor", "flat"])
def test_on_device_statistics_are_tensors_with_the_same_values(granularity):
    """A training loop sums them on the device and reads them once; they equal the float ones."""
    task = [T(1.0, 0.0), T(0.0, 1.0)]
    align = [T(-2.0, 0.0), T(0.0, 1.0)]
    g_host, host = purify_gradients_with_stats(task, align, granularity=granularity)
    g_dev, dev = purify_gradients_with_stats(task, align, granularity=granularity, on_device=True)
    assert isinstance(host.conflict, float) and isinstance(host.cosine, float)
    assert isinstance(dev.conflict, torch.Tensor) and isinstance(dev.cosine, torch.Tensor)
    assert dev.conflict.dim() == 0 and dev.conflict.device == task[0].device
    assert (float(dev.conflict), float(dev.cosine)) == (host.conflict, host.cosine)
    assert all(torch.equal(a, b) for a, b in zip(g_host, g_dev, strict=True))
    _, zero = purify_gradients_with_stats([torch.zeros(3)], [T(1.0, 0.0, 0.0)], on_device=True)
    assert float(zero.cosine) == 0.0 and float(zero.conflict) == 0.0


@pytest.mark.parametrize("granularity", ["tensor", "flat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_gradients_purify_as_the_two_lists(granularity, dtype):
    """The training path (one [2, ...] stack per parameter, as a batched backward returns them)
    gives the values and statistics of the list API."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 8), (8,), (2, 3, 5)]
    stacked = [torch.randn(2, *shape, generator=g, dtype=dtype) for shape in shapes]
    stacked[1][1] = -stacked[1][0]  # one certain conflict
    before = [s.clone() for s in stacked]
    out, stats = purify_stacked_with_stats(stacked, granularity=granularity)
    want, want_stats = purify_gradients_with_stats([s[0] for s in stacked], [s[1] for s in stacked], granularity)
    assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))
    assert (stats.conflict, stats.cosine) == (want_stats.conflict, want_stats.cosine)
    assert all(torch.equal(s, b) for s, b in zip(stacked, before, strict=True))  # inputs untouched
    assert [o.shape for o in out] == [torch.Size(s) for s in shapes] and all(o.dtype == dtype for o in out)


def test_stacked_gradients_are_validated():
    with pytest.raises(ValueError, match="neither loss reaches"):
        purify_stacked_with_stats([torch.zeros(2, 3), None])
    with pytest.raises(ValueError, match="leading dimension of 2"):
        purify_stacked_with_stats([torch.zeros(3, 3)])
    assert purify_stacked_with_stats([]) == ([], PurificationStats(conflict=0.0, cosine=0.0))
