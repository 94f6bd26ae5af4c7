"""The local loops on real cached features: Stage 1 touches only phi_g, Stage 2 only phi_k."""

import numpy as np
import pytest
import torch

from fedpurel_app.config import NodeConfig, NodeConfigError, parse_node_config
from fedpurel_app.data.client import client_data, fedlt_split
from fedpurel_app.inputs import client_feature_sets, clip_of, feature_cache_dir
from fedpurel_app.methods.base import build_method
from fedpurel_app.peft.base import build_peft, input_kind
from fedpurel_app.purification import purify_gradients
from fedpurel_app.training import (
    Stage1Options,
    grad_scaler,
    predict,
    seeded_generator,
    stage1_step,
    train_global,
    train_private,
)
from tests.conftest import SMALL_RUN, make_cfg


def client_sets(cfg, partition_id=0, num_partitions=5):
    """A client's (train, test) feature sets through the pipeline the ClientApp uses."""
    clip = clip_of(cfg.model, cfg.data)
    data = client_data(cfg.data, cfg.seed, NodeConfig(partition_id=partition_id, num_partitions=num_partitions))
    return client_feature_sets(clip, input_kind(cfg.peft.name), data, feature_cache_dir(cfg.model))


def build_model(cfg, partition_id=0, num_partitions=5):
    clip = clip_of(cfg.model, cfg.data)
    data = client_data(cfg.data, cfg.seed, NodeConfig(partition_id=partition_id, num_partitions=num_partitions))
    return build_peft(cfg, clip, data.classnames, data.template)


def stage1_options(cfg, precision="fp32"):
    return build_method(cfg).stage1_options(precision)


@pytest.fixture(scope="module")
def setup(small_cfg):
    model = build_model(small_cfg)
    train, test = client_sets(small_cfg, 0, 5)
    return small_cfg, model, train, test


def test_client_features_are_its_own_partition(small_cfg):
    split = fedlt_split(small_cfg.data, small_cfg.seed, 5)
    train, test = client_sets(small_cfg, 2, 5)
    assert len(train) == len(split.client_train[2]) and len(test) == len(split.client_test[2])
    labels = client_data(small_cfg.data, small_cfg.seed, NodeConfig(partition_id=2, num_partitions=5)).train.labels
    assert np.array_equal(train.labels.cpu().numpy(), np.asarray(labels))
    other = client_data(small_cfg.data, small_cfg.seed, NodeConfig(partition_id=3, num_partitions=5))
    mine = client_data(small_cfg.data, small_cfg.seed, NodeConfig(partition_id=2, num_partitions=5))
    assert other.train_identity != mine.train_identity and other.test_identity != mine.test_identity
    with pytest.raises(NodeConfigError, match=r"partition-id \(5\) must be smaller than num-partitions \(5\)"):
        parse_node_config({"partition-id": 5, "num-partitions": 5})


def test_stage1_step_applies_the_purified_gradient(setup):
    """One SGD step (no momentum, no decay) moves phi_g by exactly -lr * purify(g_task, g_align)."""
    cfg, model, train, _ = setup
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    model.load_global_state({"ctx": model.global_state()["ctx"] + 0.05 * noise})
    options = Stage1Options(align="tkl", lr=0.1, momentum=0.0, weight_decay=0.0)
    x, y, z = train.features[:16], train.labels[:16], train.zero_shot_logits[:16]
    from fedpurel_app.tkl import temperature_aligned_kl

    (ctx,) = model.global_parameters()
    logits = model.global_logits(x)
    g_task = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), ctx, retain_graph=True)
    g_align = torch.autograd.grad(temperature_aligned_kl(logits, z), ctx)
    expected = ctx.detach() - 0.1 * purify_gradients(g_task, g_align)[0]
    private_before = model.private_state()["ctx"]
    optimizer = torch.optim.SGD([ctx], lr=0.1)
    task_loss, align_loss, stats = stage1_step(model, x, y, z, optimizer, options)
    torch.testing.assert_close(ctx.detach(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(model.private_state()["ctx"], private_before)
    assert stats is not None and 0.0 <= stats.conflict <= 1.0 and -1.0 <= stats.cosine <= 1.0
    assert task_loss > 0 and align_loss >= 0


def test_stage1_steps_keep_their_statistics_on_the_device_until_the_round_ends(setup):
    """No host read per step (on a GPU each would wait for the device): the step returns
    tensors, and a client's round reads their sums once, as floats."""
    cfg, model, train, _ = setup
    options = Stage1Options(align="tkl", lr=0.01, momentum=0.0, weight_decay=0.0)
    (ctx,) = model.global_parameters()
    task_loss, align_loss, stats = stage1_step(
        model,
        train.features[:16],
        train.labels[:16],
        train.zero_shot_logits[:16],
        torch.optim.SGD([ctx], lr=0.01),
        options,
    )
    values = (task_loss, align_loss, stats.conflict, stats.cosine)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values)
    means = train_global(model, train, options, 1, 16, seeded_generator(0, 1, 1, 0)).means()
    assert all(type(v) is float for v in means.values())
    assert 0.0 <= means["conflict-rate"] <= 1.0 and means["task-loss"] > 0


def test_align_none_is_plain_cross_entropy(setup):
    cfg, model, train, _ = setup
    options = Stage1Options(align="none", lr=0.1, momentum=0.0, weight_decay=0.0)
    x, y, z = train.features[:16], train.labels[:16], train.zero_shot_logits[:16]
    (ctx,) = model.global_parameters()
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model.global_logits(x), y), ctx)
    expected = ctx.detach() - 0.1 * g
    _, align_loss, stats = stage1_step(model, x, y, z, torch.optim.SGD([ctx], lr=0.1), options)
    torch.testing.assert_close(ctx.detach(), expected, atol=1e-6, rtol=1e-5)
    assert stats is None and align_loss == 0.0


def test_train_global_is_deterministic_for_a_seed(setup):
    cfg, model, train, _ = setup
    start = model.global_state()
    results = []
    for _ in range(2):
        model.load_global_state(start)
        stats = train_global(model, train, stage1_options(cfg), 2, 8, seeded_generator(0, 1, 1, 0))
        results.append(model.global_state()["ctx"])
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], start["ctx"])
    assert stats.steps == 2 * -(-len(train) // 8)


def test_stage2_trains_phi_k_only_and_lowers_its_loss(small_cfg):
    """Stage 2 moves phi_k only and lowers the residual loss it minimizes on the client's data.

    A model of its own, so the outcome does not depend on what earlier tests did to ``setup``.
    """
    from fedpurel_app.residual import residual_loss

    train, _ = client_sets(small_cfg, 0, 5)
    model = build_model(small_cfg)
    lam = 0.9

    def full_loss():
        with torch.no_grad():
            return residual_loss(
                model.global_logits(train.features), model.private_logits(train.features), train.labels, lam
            ).item()

    global_before = model.global_state()["ctx"]
    private_before = model.private_state()["ctx"]
    loss_before = full_loss()
    for epoch in range(20):
        train_private(
            model, train, lam=lam, lr=0.05, epochs=1, batch_size=8, generator=seeded_generator(0, 2, epoch, 0)
        )
    assert torch.equal(model.global_state()["ctx"], global_before)
    assert not torch.equal(model.private_state()["ctx"], private_before)
    assert full_loss() < 0.9 * loss_before


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_parameters_and_tracks_fp32(setup, precision):
    """Autocast forward passes (CPU autocast here, CUDA on GPUs): phi_g stays fp32 and the
    update is close to the fp32 one (fp16 through torch's GradScaler)."""
    cfg, model, train, _ = setup
    start = model.global_state()
    results = {}
    for mode in ("fp32", precision):
        model.load_global_state(start)
        options = Stage1Options(align="tkl", lr=0.05, momentum=0.0, weight_decay=0.0, precision=mode)
        (ctx,) = model.global_parameters()
        stage1_step(
            model,
            train.features[:16],
            train.labels[:16],
            train.zero_shot_logits[:16],
            torch.optim.SGD([ctx], lr=0.05),
            options,
        )
        assert ctx.dtype == torch.float32
        results[mode] = model.global_state()["ctx"] - start["ctx"]
    assert torch.isfinite(results[precision]).all()
    assert torch.linalg.vector_norm(results[precision]) > 0
    cosine = torch.nn.functional.cosine_similarity(results["fp32"].flatten(), results[precision].flatten(), dim=0)
    assert cosine > 0.9, f"{precision} update points elsewhere than the fp32 one (cos {cosine:.3f})"
    loss = train_private(model, train, 0.9, 0.05, 1, 8, seeded_generator(0, 2, 1, 0), precision)
    assert loss == loss and all(p.dtype == torch.float32 for p in model.private_parameters())
    preds = predict(model, train.features, True, precision)
    assert preds.shape == train.labels.shape


def test_auto_precision_is_fp32_on_cpu():
    from fedpurel_app.training import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_purification_statistics_are_reported_only_when_purification_ran(setup):
    cfg, model, train, _ = setup
    plain = train_global(model, train, Stage1Options(align="none", lr=0.01), 1, 8, seeded_generator(0, 1, 9, 0))
    assert "conflict-rate" not in plain.means() and "mean-cosine" not in plain.means()
    purified = train_global(model, train, Stage1Options(align="tkl", lr=0.01), 1, 8, seeded_generator(0, 1, 9, 0))
    assert 0.0 <= purified.means()["conflict-rate"] <= 1.0


@pytest.mark.parametrize("variant", ["prompt", "adapter", "lora"])
def test_both_gradients_in_one_backward_equal_two_separate_passes(small_cfg, variant):
    """The Stage-1 step's single batched backward gives exactly the gradients of two passes."""
    from fedpurel_app.tkl import temperature_aligned_kl
    from fedpurel_app.training import both_gradients

    cfg = make_cfg({**SMALL_RUN, "peft.name": variant})
    model = build_model(cfg)
    with torch.no_grad():  # leave the zero-shot point so that every tensor has a gradient
        for p in model.global_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    train, _ = client_sets(cfg, 0, 5)
    x, y, z = train.features[:8], train.labels[:8], train.zero_shot_logits[:8]
    params = model.global_parameters()

    def losses():
        logits = model.global_logits(x)
        return torch.nn.functional.cross_entropy(logits, y), temperature_aligned_kl(logits, z)

    task_loss, align_loss = losses()
    expected_task = torch.autograd.grad(task_loss, params, retain_graph=True)
    expected_align = torch.autograd.grad(align_loss, params)
    stacked = both_gradients(*losses(), params)
    for got, want_task, want_align in zip(stacked, expected_task, expected_align, strict=True):
        assert got.shape == (2, *want_task.shape)
        assert torch.equal(got[0], want_task) and torch.equal(got[1], want_align)
    unused = torch.nn.Parameter(torch.zeros(3))
    assert both_gradients(*losses(), [*params, unused])[-1] is None


def test_the_loss_scaler_is_torchs_dynamic_scaler_for_fp16_only():
    cpu = torch.device("cpu")
    assert isinstance(grad_scaler(cpu, "fp16"), torch.amp.GradScaler) and grad_scaler(cpu, "fp16").is_enabled()
    assert not grad_scaler(cpu, "fp32").is_enabled() and not grad_scaler(cpu, "bf16").is_enabled()


def test_a_scaled_purified_step_is_the_unscaled_step(setup):
    """Purification is invariant to scaling both losses: scaling before the backward passes and
    unscaling in scaler.step gives the update of the unscaled step."""
    cfg, model, train, _ = setup
    start = model.global_state()
    options = Stage1Options(align="tkl", lr=0.1, momentum=0.0, weight_decay=0.0)
    x, y, z = train.features[:16], train.labels[:16], train.zero_shot_logits[:16]
    updates = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model.load_global_state({"ctx": start["ctx"] + 0.05})
        (ctx,) = model.global_parameters()
        stage1_step(model, x, y, z, torch.optim.SGD([ctx], lr=0.1), options, scaler=scaler)
        updates.append(model.global_state()["ctx"] - start["ctx"] - 0.05)
    assert torch.linalg.vector_norm(updates[0]) > 0
    torch.testing.assert_close(updates[1], updates[0], atol=1e-6, rtol=1e-4)


def test_fp16_steps_that_overflow_are_skipped_and_the_scale_adapts(setup):
    """A loss scale too large for fp16 gradients: the step is skipped (phi_g unchanged) and the
    scale halves; once it fits, the step applies a finite update and the scale grows again."""
    cfg, model, train, _ = setup
    model.load_global_state({"ctx": model.global_state()["ctx"] + 0.05})
    options = Stage1Options(align="tkl", lr=0.05, momentum=0.0, weight_decay=0.0, precision="fp16")
    x, y, z = train.features[:16], train.labels[:16], train.zero_shot_logits[:16]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1)
    (ctx,) = model.global_parameters()
    optimizer = torch.optim.SGD([ctx], lr=0.05)
    before = model.global_state()["ctx"]
    stage1_step(model, x, y, z, optimizer, options, scaler=scaler)
    assert torch.equal(model.global_state()["ctx"], before), "an overflowed fp16 step was applied"
    assert scaler.get_scale() == 2.0**39
    for _ in range(40):
        scale = scaler.get_scale()
        stage1_step(model, x, y, z, optimizer, options, scaler=scaler)
        after = model.global_state()["ctx"]
        if not torch.equal(after, before):
            break
        assert scaler.get_scale() == scale / 2
    else:
        pytest.fail("the scale never came down to one that fp16 gradients fit")
    assert torch.isfinite(after).all() and ctx.dtype == torch.float32
    assert scale < 2.0**20 and scaler.get_scale() == 2 * scale  # growth_interval=1: grows after a good step


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_stage2_skips_overflowed_fp16_steps(setup, monkeypatch, precision):
    """The Stage-2 loop goes through the same scaler: with a scale too large for fp16 every step
    is skipped (phi_k unchanged, loss finite); without fp16 the scaler is off and phi_k trains."""
    import fedpurel_app.training as training

    cfg, model, train, _ = setup
    monkeypatch.setattr(
        training,
        "grad_scaler",
        lambda device, p: torch.amp.GradScaler(device.type, init_scale=2.0**40, enabled=p == "fp16"),
    )
    before = model.private_state()["ctx"]
    data = training.FeatureSet(train.features[:16], train.labels[:16], train.zero_shot_logits[:16])
    loss = train_private(model, data, 0.9, 0.05, 1, 8, seeded_generator(0, 2, 1, 0), precision)
    assert np.isfinite(loss) and loss > 0
    assert torch.equal(model.private_state()["ctx"], before) == (precision == "fp16")
