"""LoRA PEFT (peft library) on a private copy of the embedded CLIP's vision encoder."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedpurel_app.config import ConfigError, NodeConfig
from fedpurel_app.data.client import client_data, dataset
from fedpurel_app.inputs import client_feature_sets, clip_of, feature_cache_dir
from fedpurel_app.peft.base import build_peft, input_kind
from fedpurel_app.peft.lora import LoraPeft, SplitQKVAttention, split_attention
from fedpurel_app.peft.prompt import PromptPeft
from fedpurel_app.training import Stage1Options, seeded_generator, stage1_step, train_private
from tests.conftest import SMALL_RUN, make_cfg

NODE = NodeConfig(partition_id=0, num_partitions=5)


def lora_cfg(**flat):
    return make_cfg({**SMALL_RUN, "peft.name": "lora", **flat})


@pytest.fixture(scope="module")
def cfg():
    return lora_cfg()


@pytest.fixture(scope="module")
def clip(cfg):
    return clip_of(cfg.model, cfg.data)


@pytest.fixture(scope="module")
def classnames(cfg):
    return dataset(cfg.data.name, cfg.data.root).classnames


def train_set(cfg):
    clip = clip_of(cfg.model, cfg.data)
    train, _ = client_feature_sets(
        clip, input_kind(cfg.peft.name), client_data(cfg.data, cfg.seed, NODE), feature_cache_dir(cfg.model)
    )
    return train


@pytest.fixture(scope="module")
def data(cfg):
    return train_set(cfg)


def fresh(cfg) -> LoraPeft:
    data = client_data(cfg.data, cfg.seed, NODE)
    return build_peft(cfg, clip_of(cfg.model, cfg.data), data.classnames, data.template)


def visual_snapshot(clip) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in clip.model.visual.state_dict().items()}


def test_inputs_are_pixels_and_zero_shot_logits_come_from_the_frozen_clip(cfg, small_cfg, data):
    assert LoraPeft.inputs == "pixels" and input_kind(cfg.peft.name) == "pixels"
    assert tuple(data.features.shape[1:]) == (3, 28, 28)
    prompt_train = train_set(small_cfg)
    assert torch.equal(prompt_train.labels, data.labels)
    torch.testing.assert_close(prompt_train.zero_shot_logits, data.zero_shot_logits)


def test_split_attention_computes_the_same_function(clip):
    """Separate q/k/v projections reproduce nn.MultiheadAttention: vision blocks, and a causal mask."""
    visual = copy.deepcopy(clip.model.visual)
    assert split_attention(visual) == 2
    assert all(isinstance(block.attn, SplitQKVAttention) for block in visual.transformer.resblocks)
    pixels = torch.randn(5, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(visual(pixels), clip.model.visual(pixels), atol=1e-5, rtol=1e-5)
    text = copy.deepcopy(clip.model.transformer)
    split_attention(text)
    x = torch.randn(3, 7, 64)
    mask = clip.model.attn_mask[:7, :7]
    with torch.no_grad():
        expected = clip.model.transformer(x, attn_mask=mask)
        torch.testing.assert_close(text(x, attn_mask=mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float-3d"])
def test_split_attention_matches_multihead_attention(batch_first, mask_kind):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    split = SplitQKVAttention(mha)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    mask = {
        "none": None,
        "bool": torch.rand(5, 6) > 0.7,
        "float-3d": torch.randn(2 * 4, 5, 6),
    }[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[:, 0] = False  # every query attends to something
    with torch.no_grad():
        expected = mha(q, kv, kv, need_weights=False, attn_mask=mask)[0]
        ours = split(q, kv, kv, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_init_gives_exactly_the_zero_shot_logits(cfg, data):
    """B = 0: both branches start at the frozen CLIP's zero-shot classifier."""
    peft = fresh(cfg)
    with torch.no_grad():
        torch.testing.assert_close(peft.global_logits(data.features), data.zero_shot_logits, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(peft.private_logits(data.features), data.zero_shot_logits, atol=1e-4, rtol=1e-5)
    state = peft.global_state()
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if ".lora_B." in k)
    assert all(torch.count_nonzero(v) > 0 for k, v in state.items() if ".lora_A." in k)


def test_init_is_seeded_and_phi_k_starts_where_phi_g_does(cfg):
    a, b = fresh(cfg), fresh(cfg)
    for key, value in a.global_state().items():
        assert torch.equal(value, b.global_state()[key])
        assert torch.equal(value, a.private_state()[key])
    other = fresh(lora_cfg(seed=1))
    assert any(not torch.equal(v, other.global_state()[k]) for k, v in a.global_state().items())


def test_global_state_is_only_the_lora_tensors_of_phi_g(cfg):
    from peft import get_peft_model_state_dict

    peft = fresh(cfg)
    state = peft.global_state()
    assert set(state) == set(get_peft_model_state_dict(peft.tower, adapter_name="global"))
    # q, k, v of each of the 2 vision blocks, an (A, B) pair each: r x in and out x r.
    assert len(state) == 2 * 3 * 2
    modules = {key.rsplit(".lora_", 1)[0] for key in state}
    assert {m.split("base_model.model.", 1)[1] for m in modules} == {
        f"transformer.resblocks.{i}.attn.{p}_proj" for i in range(2) for p in "qkv"
    }
    for key, value in state.items():
        assert key.endswith((".lora_A.weight", ".lora_B.weight"))
        assert tuple(value.shape) == ((8, 64) if ".lora_A." in key else (64, 8))
        assert "private" not in key and "global" not in key
    # Values of phi_g, not of phi_k; the frozen tower is not part of the module's parameters.
    with torch.no_grad():
        for p in peft.private_parameters():
            p.add_(1.0)
    assert all(torch.equal(v, peft.global_state()[k]) for k, v in state.items())
    assert all(not torch.equal(v, peft.private_state()[k]) for k, v in state.items())
    names = [name for name, _ in peft.named_parameters()]
    assert len(names) == 24 and all(n.startswith(("phi_g.", "phi_k.")) for n in names)
    assert {id(p) for p in peft.global_parameters()}.isdisjoint(id(p) for p in peft.private_parameters())


def test_load_global_state_round_trips_and_refuses_wrong_states(cfg, clip, classnames):
    peft = fresh(cfg)
    state = {k: torch.randn_like(v) for k, v in peft.global_state().items()}
    peft.load_global_state({k: v.numpy() for k, v in state.items()})
    assert all(torch.equal(v, peft.global_state()[k]) for k, v in state.items())
    key = next(iter(state))
    with pytest.raises(ValueError, match="keys do not match"):
        peft.load_global_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="keys do not match"):
        peft.load_global_state({**state, "base_model.model.conv1.lora_A.weight": torch.zeros(8, 64)})
    with pytest.raises(ValueError, match="keys do not match"):
        peft.load_global_state(PromptPeft(clip, classnames).global_state())
    rank4 = LoraPeft(clip, classnames, rank=4)
    with pytest.raises(ValueError, match="has shape"):
        peft.load_global_state(rank4.global_state())
    assert all(torch.equal(v, peft.global_state()[k]) for k, v in state.items()), "a refused load changed phi_g"


def test_lora_state_dicts_round_trip_exactly_into_the_right_adapter(cfg, clip, classnames, data):
    """peft's set_peft_model_state_dict puts each tensor back into its own module and adapter:
    a model loaded with another model's phi_g and phi_k computes exactly its logits."""
    source = fresh(cfg)
    with torch.no_grad():
        for i, p in enumerate([*source.global_parameters(), *source.private_parameters()]):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    target = fresh(cfg)
    target.load_global_state(source.global_state())
    target.load_private_state(source.private_state())
    for got, want in ((target.global_state(), source.global_state()), (target.private_state(), source.private_state())):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    x = data.features[:6]
    with torch.no_grad():
        assert torch.equal(target.global_logits(x), source.global_logits(x))
        assert torch.equal(target.private_logits(x), source.private_logits(x))
        assert not torch.allclose(target.global_logits(x), target.private_logits(x)), "phi_g and phi_k mixed up"
    # The parameters the loops step are the ones loaded into.
    loaded = {id(p) for p in target.private_parameters()}
    assert loaded.isdisjoint(id(p) for p in target.global_parameters())
    pairs = zip(target.private_parameters(), source.private_parameters(), strict=True)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in pairs)


def test_a_wrong_phi_k_is_refused_and_changes_nothing(cfg, clip, classnames):
    peft = fresh(cfg)
    before = peft.private_state()
    rank4 = LoraPeft(clip, classnames, rank=4)
    with pytest.raises(ValueError, match=r"phi_k\[.*\] has shape \((4, 64|64, 4)\)"):
        peft.load_private_state(rank4.private_state())
    with pytest.raises(ValueError, match="phi_k keys do not match"):
        peft.load_private_state({**before, "extra.lora_A.weight": torch.zeros(8, 64)})
    assert all(torch.equal(v, before[k]) for k, v in peft.private_state().items()), "a refused load changed phi_k"


def test_stage1_step_changes_phi_g_only_and_not_the_shared_clip(cfg, clip, data):
    peft = fresh(cfg)
    before_clip = visual_snapshot(clip)
    g0, k0 = peft.global_state(), peft.private_state()
    x, y, z = data.features[:16], data.labels[:16], data.zero_shot_logits[:16]
    optimizer = torch.optim.SGD(peft.global_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):  # B = 0 at first: A gets a gradient from the second step on
        task_loss, align_loss, stats = stage1_step(peft, x, y, z, optimizer, Stage1Options(lr=0.1))
    g1 = peft.global_state()
    assert all(torch.isfinite(v).all() for v in g1.values())
    assert any(not torch.equal(v, g0[k]) for k, v in g1.items() if ".lora_B." in k)
    assert all(torch.equal(v, k0[k]) for k, v in peft.private_state().items())
    assert stats is not None and 0.0 <= stats.conflict <= 1.0
    assert all(torch.equal(v, before_clip[k]) for k, v in clip.model.visual.state_dict().items())
    with torch.no_grad():
        assert not torch.allclose(peft.global_logits(x), z, atol=1e-3)


def test_stage2_changes_phi_k_only_and_not_the_shared_clip(cfg, clip, data):
    peft = fresh(cfg)
    before_clip = visual_snapshot(clip)
    g0, k0 = peft.global_state(), peft.private_state()
    train_private(peft, data, lam=0.9, lr=0.1, epochs=1, batch_size=32, generator=seeded_generator(0, 2, 1, 0))
    assert all(torch.equal(v, g0[k]) for k, v in peft.global_state().items())
    assert any(not torch.equal(v, k0[k]) for k, v in peft.private_state().items())
    assert all(torch.equal(v, before_clip[k]) for k, v in clip.model.visual.state_dict().items())
    assert all(isinstance(b.attn, nn.MultiheadAttention) for b in clip.model.visual.transformer.resblocks)
    assert not any("lora" in name for name, _ in clip.model.named_modules())


@pytest.mark.parametrize(("rslora", "expected"), [(False, 16.0 / 4), (True, 16.0 / 2)])
def test_rslora_scales_by_alpha_over_sqrt_r(clip, classnames, rslora, expected):
    """peft's default scales B A x by alpha / r; rslora (the reference) by alpha / sqrt(r)."""
    peft = LoraPeft(clip, classnames, rank=4, alpha=16.0, rslora=rslora)
    layer = peft.tower.base_model.model.transformer.resblocks[0].attn.q_proj
    assert layer.scaling["global"] == pytest.approx(expected)
    with torch.no_grad():
        layer.lora_B["global"].weight.normal_()
        x = torch.randn(3, 64)
        peft.tower.set_adapter("global")
        delta = layer(x) - layer.base_layer(x)
        lora = x @ layer.lora_A["global"].weight.T @ layer.lora_B["global"].weight.T
    torch.testing.assert_close(delta, expected * lora, atol=1e-5, rtol=1e-4)


def test_targets_are_configurable(clip, classnames):
    two = LoraPeft(clip, classnames, targets="q_proj,v_proj")
    assert len(two.global_state()) == 2 * 2 * 2
    regex = LoraPeft(clip, classnames, targets=r"re:transformer\.resblocks\.1\.(attn\.out_proj|mlp\.c_fc)")
    assert sorted(k.split("resblocks.")[1] for k in regex.global_state()) == [
        "1.attn.out_proj.lora_A.weight",
        "1.attn.out_proj.lora_B.weight",
        "1.mlp.c_fc.lora_A.weight",
        "1.mlp.c_fc.lora_B.weight",
    ]
    with pytest.raises(ValueError, match="q_proj"):  # the message lists the tower's Linear names
        LoraPeft(clip, classnames, targets="query")


def test_config_knobs_reach_the_variant_and_bad_targets_are_refused(cfg):
    custom = fresh(lora_cfg(**{"peft.lora.rank": 2, "peft.lora.alpha": 4.0, "peft.lora.rslora": True}))
    layer = custom.tower.base_model.model.transformer.resblocks[1].attn.v_proj
    assert layer.r["global"] == 2 and layer.scaling["global"] == pytest.approx(4.0 / 2**0.5)
    for bad in ("", "q proj", "re:(", "re:"):
        with pytest.raises(ConfigError, match=r"key 'peft\.lora\.targets'.*is invalid: peft\.lora\.targets"):
            make_cfg({"peft.name": "lora", "peft.lora.targets": bad})


class DictMemory(dict):
    """A node's memory (Flower's context.state in the ClientApp) in a dict."""

    def put(self, name, tensors):
        self[name] = {k: v.detach().cpu().clone() for k, v in tensors.items()}

    def drop(self, name):
        self.pop(name, None)

    def names(self):
        return list(self)


def test_a_lora_client_keeps_no_pixels_in_memory_and_replies_only_phi_g(cfg, monkeypatch):
    import fedpurel_app.client as client_module
    from fedpurel_app.client import PHI_K, Client
    from fedpurel_app.protocol import Instruction

    node = NodeConfig(partition_id=0, num_partitions=4)
    memory = DictMemory()
    phi_g = fresh(cfg).global_state()
    sent, reply = Client(cfg, node, memory, Instruction(1)).train(phi_g)
    assert set(sent) == set(phi_g) and reply.partition_id == 0 and reply.num_examples > 0
    (features,) = [name for name in memory.names() if name.startswith(client_module.FEATURES)]
    assert set(memory[features]) == {f"{s}.{f}" for s in ("train", "test") for f in ("labels", "zero_shot_logits")}
    calls = []
    original = client_module.variant_inputs
    monkeypatch.setattr(client_module, "variant_inputs", lambda *a: calls.append(a[1]) or original(*a))
    Client(cfg, node, memory, Instruction(2)).personalize(phi_g)
    assert PHI_K in memory.names() and set(memory[PHI_K]) == set(phi_g)
    assert all(not torch.equal(memory[PHI_K][k], phi_g[k]) for k in phi_g if ".lora_B." in k)
    evaluation = Client(cfg, node, memory, Instruction(2)).evaluate(phi_g).evaluation
    assert calls == ["pixels"] * 4, "pixels are recomputed per message (train and test)"
    test_labels = client_data(cfg.data, cfg.seed, node).test.labels
    assert evaluation.personalized and evaluation.num_examples == len(test_labels)
    assert list(evaluation.class_total) == np.bincount(test_labels, minlength=20).tolist()
