"""Zero-shot text classifiers: open_clip's build_zero_shot_classifier behind
features.zero_shot_text_features, template ensembles, and the per-Clip cache."""

import dataclasses

import pytest
import torch

from fedpurel_app.inputs import clip_of
from fedpurel_app.models import zero_shot_text_features

NAMES = ("zero", "one", "two", "three")
TEMPLATES = ("a photo of the digit {}.", "a blurry photo of a {}.", "a drawing of the number {}.")


@pytest.fixture()
def clip(small_cfg):
    """The run's frozen CLIP in a fresh Clip object (same model, empty cache)."""
    return dataclasses.replace(clip_of(small_cfg.model, small_cfg.data))


def _encode(clip, texts):
    with torch.no_grad():
        return clip.model.encode_text(clip.tokenizer(list(texts)), normalize=True).float()


def test_one_template_is_encode_text_normalised_to_within_float_rounding(clip):
    """open_clip normalises the (one-template) mean again: not bitwise today's encode_text
    features, but within a few float32 ulps (3e-8 measured)."""
    feats = zero_shot_text_features(clip, NAMES, TEMPLATES[0])
    assert feats.shape == (len(NAMES), 64) and feats.dtype == torch.float32 and feats.is_contiguous()
    expected = _encode(clip, [TEMPLATES[0].format(c) for c in NAMES])
    assert (feats - expected).abs().max().item() <= 2e-7
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(NAMES)))
    assert torch.equal(zero_shot_text_features(clip, NAMES, [TEMPLATES[0]]), feats)


def test_a_template_ensemble_is_the_normalised_mean_of_its_templates(clip):
    feats = zero_shot_text_features(clip, NAMES, TEMPLATES)
    per_template = torch.stack([_encode(clip, [t.format(c) for c in NAMES]) for t in TEMPLATES])
    mean = per_template.mean(dim=0)
    torch.testing.assert_close(feats, mean / mean.norm(dim=1, keepdim=True))
    batched = zero_shot_text_features(clip, NAMES, TEMPLATES, classes_per_batch=3)
    torch.testing.assert_close(batched, feats)


@pytest.mark.parametrize(
    "classnames, template, match",
    [
        (NAMES, "no placeholder", "must contain"),
        (NAMES, [], "no template"),
        (NAMES, ["{}", "x"], "must contain"),
        ((), "a {}", "classnames is empty"),
    ],
)
def test_bad_inputs_are_clear_errors(clip, classnames, template, match):
    with pytest.raises(ValueError, match=match):
        zero_shot_text_features(clip, classnames, template)


def test_the_model_keeps_its_training_mode(clip):
    clip.model.train()
    try:
        zero_shot_text_features(clip, NAMES, TEMPLATES[0])
        assert clip.model.training
    finally:
        clip.model.eval()


def test_clip_computes_zero_shot_text_once_per_classnames_and_template(clip, monkeypatch):
    calls = []
    encode = clip.model.encode_text

    def counted(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(clip.model, "encode_text", counted)
    first = clip.zero_shot_text(list(NAMES), TEMPLATES[0])
    assert len(calls) == 1
    assert clip.zero_shot_text(NAMES, TEMPLATES[0]) is first  # a list or a tuple of the same names
    assert clip.zero_shot_text(NAMES, [TEMPLATES[0]]) is first  # one template, alone or in a list
    assert len(calls) == 1
    torch.testing.assert_close(first, zero_shot_text_features(clip, NAMES, TEMPLATES[0]))
    calls.clear()

    ensemble = clip.zero_shot_text(NAMES, TEMPLATES)
    other_names = clip.zero_shot_text(NAMES[:2], TEMPLATES[0])
    assert len(calls) == 2 and ensemble is not first and other_names.shape == (2, 64)
    assert clip.zero_shot_text(NAMES, list(TEMPLATES)) is ensemble and len(calls) == 2

    copy = dataclasses.replace(clip)  # another Clip object: its own, empty cache
    assert copy.zero_shot_text(NAMES, TEMPLATES[0]) is not first and len(calls) == 3
    assert clip == copy and "_zero_shot" not in repr(clip)
