"""Tests for fedpurel_app.residual (docs/METHOD.md "Stage 2")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedpurel_app.residual import fuse_logits, residual_loss


def test_fuse_logits_is_sum():
    lg = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    lp = torch.tensor([[0.5, -2.0], [0.0, 1.0]])
    assert torch.equal(fuse_logits(lg, lp), torch.tensor([[1.5, 0.0], [3.0, 0.0]]))
    with pytest.raises(ValueError):
        fuse_logits(torch.zeros(2, 3), torch.zeros(2, 4))


def test_residual_loss_hand_value():
    # l_G = [ln 2, 0], l_P = [0, ln 3], y = 1
    # fused = [ln 2, ln 3] -> softmax = [2/5, 3/5] -> CE = ln(5/3) = 0.5108256...
    # CE(l_P) : softmax([0, ln 3]) = [1/4, 3/4] -> CE = ln(4/3) = 0.2876821...
    # lam = 0.9: 0.1 * 0.5108256 + 0.9 * 0.2876821 = 0.3099964...
    lg = torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64)
    lp = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    y = torch.tensor([1])
    loss = residual_loss(lg, lp, y, lam=0.9)
    expected = 0.1 * math.log(5.0 / 3.0) + 0.9 * math.log(4.0 / 3.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.3099964, abs=1e-6)


def test_residual_loss_lam_endpoints():
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(5, 4, generator=g)
    lp = torch.randn(5, 4, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    assert residual_loss(lg, lp, y, 0.0).item() == pytest.approx(F.cross_entropy(lg + lp, y).item(), abs=1e-6)
    assert residual_loss(lg, lp, y, 1.0).item() == pytest.approx(F.cross_entropy(lp, y).item(), abs=1e-6)


def test_global_logits_get_no_gradient():
    lg = torch.randn(3, 4, requires_grad=True)
    lp = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 3])
    residual_loss(lg, lp, y, 0.5).backward()
    assert lg.grad is None
    assert lp.grad is not None and torch.isfinite(lp.grad).all() and lp.grad.abs().sum() > 0


@pytest.mark.parametrize("lam", [-0.1, 1.1, float("nan"), float("inf")])
def test_lam_out_of_range(lam):
    with pytest.raises(ValueError):
        residual_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), lam)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_extreme(dtype):
    lg = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]], dtype=dtype)
    lp = torch.tensor([[-1e4, 1e4, 0.0], [1.0, 2.0, 3.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([2, 0])
    loss = residual_loss(lg, lp, y, 0.9)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert lp.grad.dtype == dtype and torch.isfinite(lp.grad.float()).all()


def test_label_shape_mismatch():
    with pytest.raises(ValueError):
        residual_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]), 0.5)
