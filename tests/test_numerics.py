"""Numerics of TKL and purification on the inputs that break naive code.

tests/test_tkl.py and tests/test_purification.py already cover: extreme and
constant logits in separate rows (fp32), half-precision inputs with one extreme
row, zero task or align gradients, tiny align gradients, half-precision extreme
gradients. Added here: identical student and teacher logits (loss exactly 0,
zero gradient), constant rows on both sides, extreme logits on both sides, a
property test mixing all of these in every dtype through the whole Stage-1
pipeline (TKL -> autograd -> purification), both gradients zero, and fp32
gradients large enough to overflow a float32 dot product.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpurel_app.purification import purify_gradients_with_stats
from fedpurel_app.tkl import aligned_temperatures, solve_temperature, temperature_aligned_kl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 2.0, 3.0], [0.5, -0.5, 0.0]],  # ordinary
        [[0.0, 0.0, 0.0], [7.0, 7.0, 7.0]],  # constant
        [[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]],  # extreme
    ],
    ids=["ordinary", "constant", "extreme"],
)
def test_identical_logits_give_zero_loss_and_zero_gradient(rows, dtype, aligned):
    f = torch.tensor(rows, dtype=dtype, requires_grad=True)
    loss = temperature_aligned_kl(f, f.detach().clone(), aligned=aligned)
    loss.backward()
    assert finite(loss) and finite(f.grad)
    assert abs(loss.item()) < 1e-6
    assert f.grad.float().abs().max().item() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_student_and_teacher_rows(dtype):
    f = torch.full((3, 5), 2.0, dtype=dtype, requires_grad=True)
    z = torch.full((3, 5), -4.0, dtype=dtype)
    tau_f, tau_z = aligned_temperatures(f, z)
    assert finite(tau_f) and finite(tau_z)
    loss = temperature_aligned_kl(f, z)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and finite(f.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_solve_temperature_on_extreme_rows_in_every_dtype(dtype):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    for target in (0.0, 0.5, math.log(3), 10.0):
        tau = solve_temperature(logits, torch.full((3,), target))
        assert finite(tau) and (tau > 0).all()


ROW = st.one_of(
    st.lists(st.floats(-30, 30), min_size=4, max_size=4),
    st.floats(-1e4, 1e4).map(lambda v: [v] * 4),  # constant
    st.lists(st.sampled_from([1e4, -1e4, 0.0]), min_size=4, max_size=4),  # extreme
)


@settings(max_examples=60, deadline=None)
@given(
    student=st.lists(ROW, min_size=1, max_size=4),
    teacher_kind=st.sampled_from(["same", "random", "reversed"]),
    dtype=st.sampled_from(DTYPES),
    aligned=st.booleans(),
    granularity=st.sampled_from(["tensor", "flat"]),
)
def test_stage1_pipeline_is_finite_on_any_logits(student, teacher_kind, dtype, aligned, granularity):
    """TKL loss and gradient, then purification against a CE gradient: never NaN/Inf."""
    f = torch.tensor(student, dtype=dtype, requires_grad=True)
    z = {
        "same": f.detach().clone(),
        "reversed": f.detach().flip(-1),
        "random": torch.randn_like(f.float()).to(dtype) * 50,
    }[teacher_kind]
    loss = temperature_aligned_kl(f, z, aligned=aligned)
    assert finite(loss) and loss.item() > -1e-4  # a KL divergence
    (g_align,) = torch.autograd.grad(loss, f)
    labels = torch.zeros(f.shape[0], dtype=torch.long)
    (g_task,) = torch.autograd.grad(torch.nn.functional.cross_entropy(f.float(), labels), f)
    assert finite(g_align) and finite(g_task)
    out, stats = purify_gradients_with_stats([g_task], [g_align], granularity=granularity)
    assert finite(out[0]) and out[0].dtype == dtype
    assert math.isfinite(stats.cosine) and math.isfinite(stats.conflict)


@pytest.mark.parametrize("granularity", ["tensor", "flat"])
def test_both_gradients_zero(granularity):
    out, stats = purify_gradients_with_stats(
        [torch.zeros(3), torch.zeros(2, 2)], [torch.zeros(3), torch.zeros(2, 2)], granularity=granularity
    )
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    assert stats.conflict == 0.0 and stats.cosine == 0.0


@pytest.mark.parametrize("granularity", ["tensor", "flat"])
def test_float32_gradients_whose_squares_overflow_float32(granularity):
    """|g|^2 = 1e60 does not fit in float32: the projection must still be finite and exact."""
    g_task = [torch.tensor([1e30, 0.0])]
    g_align = [torch.tensor([-1e30, 1e30])]
    out, stats = purify_gradients_with_stats(g_task, g_align, granularity=granularity)
    assert finite(out[0])
    torch.testing.assert_close(out[0], torch.tensor([0.5e30, 0.5e30]), rtol=1e-4, atol=0.0)
    assert stats.conflict == 1.0 and stats.cosine == pytest.approx(-(2**-0.5), abs=1e-4)
