"""The methods: their math against hand-computed values, and what each one trains."""

import math

import numpy as np
import pytest
import torch

from fedpurel_app.config import ConfigError, NodeConfig
from fedpurel_app.data.client import class_counts, client_data
from fedpurel_app.inputs import FeatureSet, client_feature_sets, clip_of, feature_cache_dir
from fedpurel_app.methods.base import build_method
from fedpurel_app.methods.fedgrab import U_MAX, balanced_ce, gradient_parts, pid_weights, tail_classes
from fedpurel_app.methods.logit_adjustment import log_prior, logit_adjusted_loss
from fedpurel_app.peft.base import build_peft, input_kind
from fedpurel_app.registry import METHODS
from fedpurel_app.training import seeded_generator, train_global
from tests.conftest import SMALL_RUN, make_cfg


def cfg_of(**flat):
    """The small run with dotted-key overrides."""
    return make_cfg({**SMALL_RUN, **flat})


def client_train(cfg, partition_id=0, num_partitions=4):
    clip = clip_of(cfg.model, cfg.data)
    data = client_data(cfg.data, cfg.seed, NodeConfig(partition_id=partition_id, num_partitions=num_partitions))
    train, _ = client_feature_sets(clip, input_kind(cfg.peft.name), data, feature_cache_dir(cfg.model))
    return train


def build_model(cfg):
    clip = clip_of(cfg.model, cfg.data)
    data = client_data(cfg.data, cfg.seed, NodeConfig(partition_id=0, num_partitions=4))
    return build_peft(cfg, clip, data.classnames, data.template)


def test_every_method_named_in_the_issue_is_registered():
    assert sorted(METHODS) == sorted(
        ["zero-shot", "promptfl", "promptfl-la", "fedpurel-kl", "fedpurel", "pft", "lp-ft", "promptfolio", "fed-grab"]
    )


def test_each_method_plans_and_purifies_as_it_declares(small_cfg, client):
    """A method's plan (what the server runs) and its Stage-1 anchor (what a step does)."""
    plans = {
        name: build_method(cfg_of(**{"method.name": name})).plan().steps
        for name in ("zero-shot", "promptfl", "fedpurel", "pft")
    }
    assert [s.phase for s in plans["zero-shot"]] == ["zero-shot"]
    for name in ("promptfl", "fedpurel", "pft"):
        assert [s.round for s in plans[name] if s.train] == [1, 2]
    assert not any(s.personalize for s in plans["promptfl"]) and plans["promptfl"][-1].phase == "final"
    for name in ("fedpurel", "pft"):  # personalize.rounds = 1 on all clients after Stage 1
        assert [(s.round, s.personalize, s.pm) for s in plans[name] if s.personalize] == [(3, "all", True)]
    assert METHODS.get("promptfl").reports == ("gm",) and METHODS.get("fedpurel").reports == ("gm", "pm")

    updates, means = {}, {}
    for name in ("promptfl", "fedpurel", "fedpurel-kl"):
        peft, method = model_and_method(small_cfg, name)
        start = peft.global_state()["ctx"]
        stats = train_global(peft, client, method.stage1_options("fp32"), 1, 8, seeded_generator(0), method)
        means[name] = stats.means()
        updates[name] = peft.global_state()["ctx"] - start
    assert "conflict-rate" not in means["promptfl"]
    assert 0.0 <= means["fedpurel"]["conflict-rate"] <= 1.0 and 0.0 <= means["fedpurel-kl"]["conflict-rate"] <= 1.0
    assert means["fedpurel"]["align-loss"] != means["fedpurel-kl"]["align-loss"]  # TKL vs plain KL anchor
    assert not torch.equal(updates["fedpurel"], updates["promptfl"])


def test_a_built_method_carries_its_name_and_its_own_options():
    method = build_method(cfg_of(**{"method.name": "promptfl-la", "method.promptfl-la.tau": 0.5}))
    assert method.name == "promptfl-la" and method.options.tau == 0.5
    grab = build_method(cfg_of(**{"method.name": "fed-grab", "method.fed-grab.kp": 2.0}))
    assert (grab.name, grab.options.kp, grab.options.ki) == ("fed-grab", 2.0, 0.01)
    options = build_method(cfg_of(**{"method.name": "fedpurel-kl", "peft.prompt.lr": 0.02})).stage1_options("bf16")
    assert (options.align, options.lr, options.precision) == ("kl", 0.02, "bf16")


# --- logit adjustment (Menon et al. 2021, eq. 10) ---


def test_log_prior_of_counts_and_of_an_empty_class():
    assert torch.allclose(log_prior(np.array([3, 1])), torch.log(torch.tensor([0.75, 0.25])))
    assert torch.allclose(log_prior(np.array([3.5, 0])), torch.log(torch.tensor([3.5 / 4, 0.5 / 4])))


def test_logit_adjusted_loss_by_hand():
    # f = [0, 0], pi = [.75, .25], tau = 1, y = 1: CE([log .75, log .25], 1) = -log .25
    loss = logit_adjusted_loss(torch.zeros(1, 2), torch.tensor([1]), log_prior(np.array([3, 1])), 1.0)
    assert loss.item() == pytest.approx(-math.log(0.25), rel=1e-6)
    # tau = 0 is plain CE: log 2
    loss = logit_adjusted_loss(torch.zeros(1, 2), torch.tensor([1]), log_prior(np.array([3, 1])), 0.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


# --- Fed-GraB's gradient balancer ---


def test_tail_classes_are_those_below_the_uniform_prior():
    assert tail_classes(np.array([100, 10, 1])).tolist() == [False, True, True]


def test_gradient_parts_by_hand():
    # p = [.5, .5] for both samples; sample 0 is class 0, sample 1 class 1.
    positive, negative = gradient_parts(torch.zeros(2, 2), torch.tensor([0, 1]))
    assert positive.tolist() == [0.5, 0.5] and negative.tolist() == [0.5, 0.5]
    positive, negative = gradient_parts(torch.zeros(2, 2), torch.tensor([0, 0]))
    assert positive.tolist() == [1.0, 0.0] and negative.tolist() == [0.0, 1.0]


def test_pid_weights_by_hand():
    e, i, prev = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    w_pos, w_neg = pid_weights(e, i, prev, kp=1.0, ki=0.1, kd=0.2, tail=torch.tensor([True, False]))
    # u_0 = 0.5 + 0.1 + 0.1 = 0.7 on the tail class; the head class keeps weight 1.
    assert torch.allclose(w_pos, torch.tensor([1.7, 1.0])) and torch.allclose(w_neg, torch.tensor([1 / 1.7, 1.0]))
    w_pos, _ = pid_weights(torch.tensor([100.0]), torch.zeros(1), torch.zeros(1), 1.0, 0.0, 0.0, torch.tensor([True]))
    assert w_pos.item() == 1.0 + U_MAX
    w_pos, _ = pid_weights(torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), 1.0, 0.0, 0.0, torch.tensor([True]))
    assert w_pos.item() == 1.0  # never below plain CE


def test_balanced_ce_has_the_value_of_ce_and_the_reweighted_gradient():
    logits = torch.zeros(1, 2, requires_grad=True)
    loss = balanced_ce(logits, torch.tensor([0]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # p = [.5, .5], y = 0: d/dz_0 = w+_0 (p_0 - 1) = -1; d/dz_1 = w-_1 p_1 = .25
    assert torch.allclose(logits.grad, torch.tensor([[-1.0, 0.25]]))


def test_fed_grab_amplifies_a_tail_class_whose_positive_gradients_are_missing(small_cfg):
    method = build_method(cfg_of(**{"method.name": "fed-grab"}), np.array([100, 50, 5]))
    labels = torch.tensor([0, 0, 1, 1])
    method.task_loss(torch.zeros(4, 3), labels)  # class 2 (tail) gets negatives only
    logits = torch.zeros(4, 3, requires_grad=True)
    method.task_loss(logits, labels).backward()
    # class 2: e = 1 - 0 / N = 1 > 0, so w- < 1 damps the negative gradient it receives
    assert logits.grad[0, 2].item() < (1 / 3) / 4 - 1e-6
    state = method.private_state()
    assert set(state) == {"grab.positive", "grab.negative", "grab.integral", "grab.error"}
    restored = build_method(cfg_of(**{"method.name": "fed-grab"}), np.array([100, 50, 5]))
    restored.load_private_state(state)
    assert all(torch.equal(restored.private_state()[k], v) for k, v in state.items())


def test_a_method_that_needs_the_prior_says_so_without_it(small_cfg):
    method = build_method(cfg_of(**{"method.name": "promptfl-la"}))
    with pytest.raises(ValueError, match="class-counts"):
        method.task_loss(torch.zeros(1, 2), torch.tensor([0]))


# --- methods on the embedded model ---


@pytest.fixture(scope="module")
def client(small_cfg):
    return client_train(small_cfg)


def model_and_method(small_cfg, name: str, **flat):
    cfg = cfg_of(**{"method.name": name, **flat})
    return build_model(cfg), build_method(cfg, class_counts(cfg.data, cfg.seed))


def test_promptfolio_trains_both_branches_on_the_mixed_logits(small_cfg, client):
    peft, method = model_and_method(small_cfg, "promptfolio")
    with torch.no_grad():
        peft.phi_k.ctx.add_(0.1)
    x = client.features[:5]
    assert torch.allclose(method.logits(peft, x), 0.8 * peft.global_logits(x) + 0.2 * peft.private_logits(x))
    g0, k0 = peft.global_state()["ctx"], peft.private_state()["ctx"]
    train_global(peft, client, method.stage1_options("fp32"), 1, 8, seeded_generator(0), method)
    assert not torch.equal(peft.global_state()["ctx"], g0) and not torch.equal(peft.private_state()["ctx"], k0)


def test_pft_fine_tunes_a_copy_of_the_final_global_model(small_cfg, client):
    frozen = {"peft.prompt.lr": 1e-9, "train.momentum": 0.0, "train.weight-decay": 0.0}
    peft, method = model_and_method(small_cfg, "pft", **frozen)
    with torch.no_grad():
        peft.phi_g.ctx.add_(0.3)  # a trained phi_g, different from phi_k's init
    method.personalize(peft, client, seeded_generator(0), first=True, precision="fp32")
    assert torch.allclose(peft.private_state()["ctx"], peft.global_state()["ctx"], atol=1e-6)
    x = client.features[:5]
    assert torch.allclose(method.personal_logits(peft, x), peft.private_logits(x))


def test_lp_ft_probes_the_head_first_then_fine_tunes_everything(small_cfg, client):
    peft, method = model_and_method(small_cfg, "lp-ft", **{"method.lp-ft.lp-rounds": 1})
    x = client.features[:5]
    method.personalize(peft, client, seeded_generator(0), first=True, precision="fp32")
    # linear probing: the copy of phi_g is untouched, the head moved
    assert torch.equal(peft.private_state()["ctx"], peft.global_state()["ctx"])
    assert method.head.abs().sum() > 0
    head = method.head.detach().clone()
    method.personalize(peft, client, seeded_generator(1), first=False, precision="fp32")
    assert not torch.equal(peft.private_state()["ctx"], peft.global_state()["ctx"])
    assert not torch.equal(method.head.detach(), head)
    # logits: exp(t) e @ (T_k + W).T, restored exactly from the private state
    restored = build_method(method.cfg)
    restored.load_private_state(method.private_state())
    assert restored.rounds_done == 2
    assert torch.allclose(restored.personal_logits(peft, x), method.personal_logits(peft, x))
    expected = peft.logit_scale * x @ (peft.class_embeddings(peft.phi_k) + method.head).T
    assert torch.allclose(method.personal_logits(peft, x), expected)


def test_lp_ft_head_starts_at_the_copy_of_phi_g(small_cfg, client):
    peft, method = model_and_method(small_cfg, "lp-ft")
    x = client.features[:5]
    assert torch.allclose(method.personal_logits(peft, x), peft.private_logits(x))


def test_interleaved_personalization_is_a_schedule_of_the_residual_methods_only():
    """Only FedPuReL (and its KL ablation) has a schedule: pft has no such key, and its plan
    personalizes all clients after Stage 1, never the sampled ones of a Stage-1 round."""
    with pytest.raises(ConfigError, match=r"unknown key 'method\.pft\.schedule'"):
        cfg_of(**{"method.name": "pft", "method.pft.schedule": "interleaved"})
    pft = build_method(cfg_of(**{"method.name": "pft", "method.fedpurel.schedule": "interleaved"}))
    assert all(step.personalize != "sampled" for step in pft.plan().steps)
    assert [s.phase for s in pft.plan().steps if s.personalize == "all"] == ["personal"]
    interleaved = build_method(cfg_of(**{"method.name": "fedpurel-kl", "method.fedpurel-kl.schedule": "interleaved"}))
    steps = interleaved.plan().steps
    assert [s.personalize for s in steps if s.train] == ["sampled", "sampled"]
    assert not any(s.personalize == "all" for s in steps)
    post = build_method(cfg_of(**{"method.name": "fedpurel-kl"})).plan().steps
    assert [s.personalize for s in post if s.train] == ["", ""] and post[-1].personalize == "all"


@pytest.mark.parametrize("name", ["lp-ft", "pft", "promptfolio"])
@pytest.mark.parametrize("variant", ["adapter", "lora"])
def test_private_branches_work_for_every_variant(small_cfg, name, variant):
    cfg = cfg_of(**{"method.name": name, "peft.name": variant, "personalize.epochs": 1})
    train = client_train(cfg, 0, 8)
    data = FeatureSet(train.features[:8], train.labels[:8], train.zero_shot_logits[:8])
    peft, method = build_model(cfg), build_method(cfg)
    k0 = peft.private_state()
    if method.personal_phase:
        method.personalize(peft, data, seeded_generator(0), first=True, precision="fp32")
    else:
        train_global(peft, data, method.stage1_options("fp32"), 1, 4, seeded_generator(0), method)
    logits = method.personal_logits(peft, data.features)
    assert logits.shape == (8, 20) and torch.isfinite(logits).all()
    moved = any(not torch.equal(v, k0[k]) for k, v in peft.private_state().items())
    if name == "lp-ft":  # its first round probes the head only
        assert not moved and method.head.abs().sum() > 0
    else:
        assert moved, f"{name} did not train the private branch of {variant}"
