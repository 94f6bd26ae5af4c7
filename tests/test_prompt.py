"""CoOp prompt PEFT over the embedded CLIP: EOT truncation, initialisation, branches."""

import pytest
import torch
import torch.nn.functional as F

from fedpurel_app import task
from fedpurel_app.peft import PromptPeft, build_peft


@pytest.fixture(scope="module")
def clip(small_cfg):
    return task.load_clip(small_cfg)


@pytest.fixture(scope="module")
def classnames(small_cfg):
    return task.dataset(small_cfg.dataset, small_cfg.data_root).classnames


def full_length_features(clip, classnames, branch):
    """Text features through open_clip's own encode_text path at the full context length."""
    n_ctx = branch.ctx.shape[0]
    prompts = [" ".join(["X"] * n_ctx) + f" {name}." for name in classnames]
    tokens = clip.tokenizer(prompts)
    model = clip.model
    embedding = model.token_embedding(tokens)
    embedding[:, 1 : 1 + n_ctx] = branch.ctx
    x = embedding + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def test_eot_truncation_gives_the_features_of_the_full_sequence(clip, classnames):
    peft = PromptPeft(clip, classnames, n_ctx=4, ctx_init="")
    with torch.no_grad():
        short = peft.text_features(peft.phi_g)
        full = full_length_features(clip, classnames, peft.phi_g)
    assert peft.positional.shape[0] < clip.model.positional_embedding.shape[0]
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


def test_phrase_init_reproduces_the_phrase_prompt(clip, classnames):
    """ctx-init 'a photo of a' starts exactly at the classifier of 'a photo of a {class}.'."""
    peft = PromptPeft(clip, classnames, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        ours = peft.text_features(peft.phi_g)
        tokens = clip.tokenizer([f"a photo of a {name}." for name in classnames])
        reference = F.normalize(clip.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_phrase_length_must_match_n_ctx(clip, classnames):
    with pytest.raises(ValueError, match="has 4 tokens but n-ctx is 3"):
        PromptPeft(clip, classnames, n_ctx=3, ctx_init="a photo of a")


def test_branches_are_separate_and_only_phi_g_is_global(clip, classnames):
    peft = PromptPeft(clip, classnames, n_ctx=4, ctx_init="")
    assert set(peft.global_state()) == {"ctx"} and set(peft.private_state()) == {"ctx"}
    with torch.no_grad():
        peft.phi_k.ctx.add_(1.0)
    assert not torch.equal(peft.global_state()["ctx"], peft.private_state()["ctx"])
    ids_g = {id(p) for p in peft.global_parameters()}
    assert ids_g.isdisjoint(id(p) for p in peft.private_parameters())
    # The frozen backbone is not part of the module's parameters or state.
    assert {name for name, _ in peft.named_parameters()} == {"phi_g.ctx", "phi_k.ctx"}


def test_loading_a_wrong_state_is_refused(clip, classnames):
    peft = PromptPeft(clip, classnames)
    with pytest.raises(ValueError, match="keys do not match"):
        peft.load_global_state({"other": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="has shape"):
        peft.load_global_state({"ctx": torch.zeros(3, 64)})


def test_build_peft_reads_the_variant_knobs_from_the_config(clip, classnames, small_cfg):
    cfg = small_cfg.model_copy(update={"n_ctx": 3, "ctx_init": ""})
    peft = build_peft("prompt", clip, classnames, "a photo of a {}.", cfg)
    assert isinstance(peft, PromptPeft) and peft.phi_g.ctx.shape[0] == 3


def test_unknown_variant_lists_the_known_ones(clip, classnames, small_cfg):
    with pytest.raises(ValueError, match="prompt"):
        build_peft("bitfit", clip, classnames, "a photo of a {}.", small_cfg)
