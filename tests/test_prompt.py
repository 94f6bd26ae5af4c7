"""CoOp prompt PEFT over the embedded CLIP: EOT truncation, initialisation, branches."""

import pytest
import torch
import torch.nn.functional as F

from fedpurel_app.config import ConfigError
from fedpurel_app.data.client import dataset
from fedpurel_app.inputs import clip_of
from fedpurel_app.peft.base import build_peft
from fedpurel_app.peft.prompt import PromptConfig, PromptPeft
from fedpurel_app.registry import PEFT_VARIANTS
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def clip(small_cfg):
    return clip_of(small_cfg.model, small_cfg.data)


@pytest.fixture(scope="module")
def classnames(small_cfg):
    return dataset(small_cfg.data.name, small_cfg.data.root).classnames


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
    with pytest.raises(ValueError, match="has 4 tokens but peft.prompt.n-ctx is 3"):
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
    before = peft.private_state()["ctx"]
    with pytest.raises(ValueError, match=r"phi_k\['ctx'\] has shape \(5, 64\), this model expects \(4, 64\)"):
        peft.load_private_state({"ctx": torch.zeros(5, 64)})
    assert torch.equal(peft.private_state()["ctx"], before)


def test_build_peft_reads_the_variant_knobs_from_the_config(clip, classnames):
    cfg = make_cfg({"peft.prompt.n-ctx": 3, "peft.prompt.ctx-init": ""})
    peft = build_peft(cfg, clip, classnames, "a photo of a {}.")
    assert isinstance(peft, PromptPeft) and peft.phi_g.ctx.shape[0] == 3
    assert PEFT_VARIANTS.get("prompt") is PromptPeft and PEFT_VARIANTS["prompt"].config is PromptConfig
    # ctx-init '' is N(0, 0.02^2) drawn with the run's seed
    again = build_peft(cfg, clip, classnames, "a photo of a {}.")
    other = build_peft(
        make_cfg({"peft.prompt.n-ctx": 3, "peft.prompt.ctx-init": "", "seed": 1}), clip, classnames, "a photo of a {}."
    )
    assert torch.equal(peft.phi_g.ctx, again.phi_g.ctx) and not torch.equal(peft.phi_g.ctx, other.phi_g.ctx)


def test_the_template_does_not_change_the_prompt(clip, classnames):
    """The learned context replaces the dataset's template: two templates, one model."""
    cfg = make_cfg({})
    a = build_peft(cfg, clip, classnames, "a photo of a {}.")
    b = build_peft(cfg, clip, classnames, "an image of the handwritten number {}.")
    with torch.no_grad():
        torch.testing.assert_close(a.text_features(a.phi_g), b.text_features(b.phi_g))


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"peft\.name.*choose one of.*'adapter', 'lora', 'prompt'"):
        make_cfg({"peft.name": "bitfit"})
    with pytest.raises(KeyError, match="prompt"):
        PEFT_VARIANTS.get("bitfit")


def test_bad_prompt_knobs_are_config_errors():
    with pytest.raises(ConfigError, match=r"peft\.prompt\.n-ctx"):
        make_cfg({"peft.prompt.n-ctx": 0})
    with pytest.raises(ConfigError, match=r"peft\.prompt\.lr"):
        make_cfg({"peft.prompt.lr": -1.0})


@pytest.mark.parametrize("chunk", [1, 3, 7, 19])
def test_chunked_text_features_equal_the_unchunked(clip, classnames, chunk):
    """Classes through the text tower in chunks: the same features (1e-6) and gradients, with and
    without gradient; automatic chunking only chunks a pass without gradient."""
    whole = PromptPeft(clip, classnames, n_ctx=4, ctx_init="", class_chunk=len(classnames))
    parts = PromptPeft(clip, classnames, n_ctx=4, ctx_init="", class_chunk=chunk)
    assert parts.chunk_size(parts.phi_g) == chunk < len(classnames)
    with torch.no_grad():
        torch.testing.assert_close(
            parts.text_features(parts.phi_g), whole.text_features(whole.phi_g), atol=1e-6, rtol=0
        )
    a, b = whole.text_features(whole.phi_g), parts.text_features(parts.phi_g)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    (ga,) = torch.autograd.grad(a.square().sum() + a[:, 0].sum(), whole.phi_g.ctx)
    (gb,) = torch.autograd.grad(b.square().sum() + b[:, 0].sum(), parts.phi_g.ctx)
    torch.testing.assert_close(gb, ga, atol=1e-6, rtol=0)


def test_automatic_chunking_chunks_only_without_gradient(clip, classnames, monkeypatch):
    peft = PromptPeft(clip, classnames, n_ctx=4, ctx_init="")
    monkeypatch.setattr(PromptPeft, "AUTO_CHUNK", 6)
    assert peft.class_chunk == 0 and peft.chunk_size(peft.phi_g) == len(classnames)
    with torch.no_grad():
        assert peft.chunk_size(peft.phi_g) == 6
        chunked = peft.text_features(peft.phi_g)
    torch.testing.assert_close(chunked, peft.text_features(peft.phi_g).detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="class_chunk must be >= 0"):
        PromptPeft(clip, classnames, class_chunk=-1)
