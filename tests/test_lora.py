"""LoRA PEFT (peft library) on a private copy of the embedded CLIP's vision encoder."""

import copy

import pytest
import torch
from torch import nn

from fedpurel_app import task
from fedpurel_app.config import ConfigError, parse_run_config
from fedpurel_app.peft import LoraPeft, PromptPeft
from fedpurel_app.peft.lora import SplitQKVAttention, split_attention
from fedpurel_app.training import Stage1Options, stage1_step, seeded_generator, train_private
from tests.conftest import SMALL_RUN


@pytest.fixture(scope="module")
def cfg():
    return parse_run_config({**SMALL_RUN, "peft": "lora"})


@pytest.fixture(scope="module")
def clip(cfg):
    return task.load_clip(cfg)


@pytest.fixture(scope="module")
def classnames(cfg):
    return task.dataset(cfg.dataset, cfg.data_root).classnames


@pytest.fixture(scope="module")
def data(cfg):
    train, _ = task.client_feature_sets(cfg, 0, 5)
    return train


def fresh(cfg) -> LoraPeft:
    return task.build_model(cfg)


def visual_snapshot(clip) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in clip.model.visual.state_dict().items()}


def test_inputs_are_pixels_and_zero_shot_logits_come_from_the_frozen_clip(cfg, small_cfg, data):
    assert LoraPeft.inputs == "pixels" and task.input_kind(cfg) == "pixels"
    assert tuple(data.features.shape[1:]) == (3, 28, 28)
    prompt_train, _ = task.client_feature_sets(small_cfg, 0, 5)
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
    other = task.build_model(cfg.model_copy(update={"seed": 1}))
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
        "1.attn.out_proj.lora_A.weight", "1.attn.out_proj.lora_B.weight",
        "1.mlp.c_fc.lora_A.weight", "1.mlp.c_fc.lora_B.weight",
    ]
    with pytest.raises(ValueError, match="q_proj"):  # the message lists the tower's Linear names
        LoraPeft(clip, classnames, targets="query")


def test_config_knobs_reach_the_variant_and_bad_targets_are_refused(cfg):
    custom = task.build_model(cfg.model_copy(update={"lora_rank": 2, "lora_alpha": 4.0, "lora_rslora": True}))
    layer = custom.tower.base_model.model.transformer.resblocks[1].attn.v_proj
    assert layer.r["global"] == 2 and layer.scaling["global"] == pytest.approx(4.0 / 2**0.5)
    for bad in ("", "q proj", "re:(", "re:"):
        with pytest.raises(ConfigError, match="lora-targets"):
            parse_run_config({"peft": "lora", "lora-targets": bad})


def test_client_app_keeps_no_pixels_in_state_and_replies_only_phi_g(cfg, monkeypatch):
    from flwr.app import Context, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client_app import app as client
    from server_app.strategy import PERSONALIZE
    from tests.test_apps import server_message

    # Messages built outside a Flower process need the identity one would have (as in test_apps).
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    context = Context(
        run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(), run_config={**SMALL_RUN, "peft": "lora"},
    )
    phi_g = task.build_model(cfg).global_state()
    reply = client.train(server_message(phi_g, MessageType.TRAIN, 1), context)
    (record,) = reply.content.array_records.values()
    assert set(record.keys()) == set(phi_g)
    cached = context.state.array_records[client.FEATURES]
    assert set(cached.keys()) == {f"{s}.{f}" for s in ("train", "test") for f in ("labels", "zero_shot_logits")}
    calls = []
    original = task.client_inputs
    monkeypatch.setattr(task, "client_inputs", lambda *a: calls.append(a) or original(*a))
    client.personalize(server_message(phi_g, PERSONALIZE, 2), context)
    evaluation = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 2), context)
    assert len(calls) == 2, "pixels are recomputed per message"
    metrics = next(iter(evaluation.content.metric_records.values()))
    assert metrics["personalized"] == 1 and len(metrics["pm-preds"]) == metrics["num-examples"]
