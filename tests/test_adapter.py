"""FedCLIP attention adapter PEFT on the embedded CLIP's cached image features."""

import pytest
import torch
import torch.nn.functional as F

from fedpurel_app.config import ConfigError, NodeConfig
from fedpurel_app.data.client import client_data
from fedpurel_app.inputs import client_feature_sets, clip_of, feature_cache_dir
from fedpurel_app.peft.adapter import AdapterPeft
from fedpurel_app.peft.base import build_peft, input_kind
from fedpurel_app.purification import purify_gradients
from fedpurel_app.tkl import temperature_aligned_kl
from fedpurel_app.training import Stage1Options, seeded_generator, stage1_step, train_private
from tests.conftest import SMALL_RUN, make_cfg

KEYS = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
NODE = NodeConfig(partition_id=0, num_partitions=5)


@pytest.fixture(scope="module")
def cfg():
    return make_cfg({**SMALL_RUN, "peft.name": "adapter"})


def train_set(cfg):
    clip = clip_of(cfg.model, cfg.data)
    train, _ = client_feature_sets(
        clip, input_kind(cfg.peft.name), client_data(cfg.data, cfg.seed, NODE), feature_cache_dir(cfg.model)
    )
    return train


def build_model(cfg, **flat):
    """The adapter of ``cfg`` (with dotted-key overrides of the small run)."""
    if flat:
        cfg = make_cfg({**SMALL_RUN, "peft.name": "adapter", **flat})
    data = client_data(cfg.data, cfg.seed, NODE)
    return build_peft(cfg, clip_of(cfg.model, cfg.data), data.classnames, data.template)


@pytest.fixture(scope="module")
def data(cfg):
    return train_set(cfg)


def test_inputs_are_the_cached_features(cfg, small_cfg, data):
    assert AdapterPeft.inputs == "features" and input_kind(cfg.peft.name) == "features"
    assert torch.equal(train_set(small_cfg).features, data.features)


def test_zero_shot_init_gives_exactly_the_zero_shot_logits(cfg, data):
    """W2 = 0, b2 = 0: a = 1/D, and norm(e / D) = e."""
    peft = build_model(cfg)
    with torch.no_grad():
        a = peft.phi_g.attention(data.features)
        torch.testing.assert_close(a, torch.full_like(a, 1.0 / a.shape[1]))
        torch.testing.assert_close(peft.global_logits(data.features), data.zero_shot_logits, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(peft.private_logits(data.features), data.zero_shot_logits, atol=1e-4, rtol=1e-5)


def test_random_init_starts_near_but_not_at_zero_shot(cfg, data):
    peft = build_model(cfg, **{"peft.adapter.init": "random"})
    with torch.no_grad():
        logits = peft.global_logits(data.features)
    assert not torch.allclose(logits, data.zero_shot_logits, atol=1e-4)
    agree = (logits.argmax(-1) == data.zero_shot_logits.argmax(-1)).float().mean()
    assert agree > 0.8


def test_init_is_seeded_and_both_branches_start_equal(cfg):
    a, b = build_model(cfg), build_model(cfg)
    c = build_model(cfg, seed=1)
    for key, value in a.global_state().items():
        assert torch.equal(value, b.global_state()[key]) and torch.equal(value, a.private_state()[key])
    assert not torch.equal(a.global_state()["fc1.weight"], c.global_state()["fc1.weight"])


def test_state_is_the_two_layers_of_one_branch(cfg):
    peft = build_model(cfg)
    state = peft.global_state()
    assert set(state) == KEYS and set(peft.private_state()) == KEYS
    assert state["fc1.weight"].shape == state["fc2.weight"].shape == (64, 64)
    assert {n for n, _ in peft.named_parameters()} == {f"{b}.{k}" for b in ("phi_g", "phi_k") for k in KEYS}
    with pytest.raises(ValueError, match="keys do not match"):
        peft.load_global_state({"ctx": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="has shape"):
        peft.load_global_state({**state, "fc1.weight": torch.zeros(64, 32)})
    private = peft.private_state()
    with pytest.raises(ValueError, match=r"phi_k\['fc2\.bias'\] has shape \(32,\)"):
        peft.load_private_state({**private, "fc2.bias": torch.zeros(32)})
    assert all(torch.equal(v, private[k]) for k, v in peft.private_state().items()), "a refused load changed phi_k"


def test_stage1_step_applies_the_purified_gradient_to_phi_g_only(cfg, data):
    """One SGD step moves phi_g by exactly -lr * purify(g_task, g_align); phi_k stays."""
    peft = build_model(cfg)
    with torch.no_grad():  # leave the zero-shot point so that every tensor has a gradient
        for p in peft.global_parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y, z = data.features[:16], data.labels[:16], data.zero_shot_logits[:16]
    params = peft.global_parameters()
    logits = peft.global_logits(x)
    g_task = torch.autograd.grad(F.cross_entropy(logits, y), params, retain_graph=True)
    g_align = torch.autograd.grad(temperature_aligned_kl(logits, z), params)
    expected = [p.detach() - 0.1 * g for p, g in zip(params, purify_gradients(g_task, g_align), strict=True)]
    private = peft.private_state()
    options = Stage1Options(lr=0.1, momentum=0.0, weight_decay=0.0)
    stage1_step(peft, x, y, z, torch.optim.SGD(params, lr=0.1), options)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(v, private[k]) for k, v in peft.private_state().items())


def test_stage2_changes_phi_k_only(cfg, data):
    peft = build_model(cfg)
    g0, k0 = peft.global_state(), peft.private_state()
    train_private(peft, data, lam=0.9, lr=0.1, epochs=1, batch_size=32, generator=seeded_generator(0, 2, 1, 0))
    assert all(torch.equal(v, g0[k]) for k, v in peft.global_state().items())
    assert not torch.equal(peft.private_state()["fc2.weight"], k0["fc2.weight"])


def test_adapter_init_is_validated():
    with pytest.raises(ConfigError, match=r"key 'peft\.adapter\.init': value 'xavier' is invalid"):
        make_cfg({"peft.name": "adapter", "peft.adapter.init": "xavier"})
    with pytest.raises(ValueError, match="adapter init 'xavier'"):
        AdapterPeft(clip_of(make_cfg().model, make_cfg().data), ("a", "b"), init="xavier")
