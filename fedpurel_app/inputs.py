"""From a client's images to what the training loops consume, through the frozen CLIP.

:class:`FeatureSet` holds one split's inputs for the PEFT variant, its labels
and the frozen zero-shot logits z. The inputs are what the variant declares
(``PeftVariant.inputs``): L2-normalised image features of the frozen encoder
(computed once, optionally kept in the on-disk feature cache), or the images
through CLIP's preprocessing when the variant puts the image encoder in the
loop (lora). z always comes from the frozen image features and the dataset's
zero-shot template.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig, ModelConfig
from .data.client import BACKBONE_SEED, ClientData, backbone_data
from .models import EMBEDDED, Clip, create_clip, default_cache_dir, encode_images, preprocess_images
from .models.feature_cache import cached_image_features
from .models.features import zero_shot_logits


@dataclass(frozen=True)
class FeatureSet:
    """Inputs of one split: the variant's inputs [N, ...], labels [N], zero-shot logits [N, C].

    ``features`` holds image features [N, D] (``inputs = "features"``) or
    pixels [N, 3, H, W] (``inputs = "pixels"``).
    """

    features: torch.Tensor
    labels: torch.Tensor
    zero_shot_logits: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, generator: torch.Generator | None):
        """Shuffled (when a generator is given) mini-batches as index tensors."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        order = order.to(self.labels.device)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]

    def to(self, device: torch.device) -> FeatureSet:
        return FeatureSet(self.features.to(device), self.labels.to(device), self.zero_shot_logits.to(device))


@functools.lru_cache(maxsize=2)
def frozen_clip(model: ModelConfig, data_name: str, data_root: str) -> Clip:
    """The run's frozen CLIP (cached per process on its config values).

    Only the embedded tiny CLIP is pretrained on (and keyed by) the dataset; real
    weights need none of it, so a node holding only its own images can load them.
    """
    return create_clip(
        model.name,
        model.pretrained,
        cache_dir=model.cache_dir or None,
        device=model.device,
        pretrain_dataset=backbone_data(data_name, data_root) if model.pretrained == EMBEDDED else None,
        seed=BACKBONE_SEED,
    )


def clip_of(model: ModelConfig, data: DataConfig) -> Clip:
    return frozen_clip(model, data.name, data.root)


def image_features(clip: Clip, split, identity: str, cache_dir: str | None) -> torch.Tensor:
    """Frozen image features of a split: from the on-disk cache in ``cache_dir`` when given."""
    if cache_dir is None:
        return encode_images(clip, split)
    return cached_image_features(clip, split, identity, cache_dir)


def variant_inputs(clip: Clip, kind: str, split, features: torch.Tensor | None = None) -> torch.Tensor:
    """The variant's inputs for a split, on the clip's device: its image ``features``
    (computed when not given), or its ``pixels`` through CLIP's preprocessing."""
    if kind == "features":
        x = features if features is not None else encode_images(clip, split)
    elif kind == "pixels":
        x = preprocess_images(clip.preprocess, split)
    else:  # pragma: no cover - a variant declaring something else
        raise ValueError(f"unknown PEFT inputs {kind!r}: 'features' or 'pixels'")
    return x.to(clip.device)


def feature_set(
    clip: Clip, kind: str, split, identity: str, classnames: tuple[str, ...], template: str, cache_dir: str | None
) -> FeatureSet:
    """A split's inputs for a variant consuming ``kind``, its labels, and z."""
    text = clip.zero_shot_text(classnames, template)
    features = image_features(clip, split, identity, cache_dir)
    logits = zero_shot_logits(clip, features, text)
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
    return FeatureSet(variant_inputs(clip, kind, split, features), labels.to(clip.device), logits.to(clip.device))


def feature_cache_dir(model: ModelConfig, node_state_dir: str = "") -> str | None:
    """Where frozen features are cached: a node's state-dir, else the run's cache folder;
    None with ``model.feature-cache = false``."""
    if not model.feature_cache:
        return None
    if node_state_dir:
        return str(Path(node_state_dir).expanduser() / "cache")
    return model.cache_dir or str(default_cache_dir())


def client_feature_sets(
    clip: Clip, kind: str, data: ClientData, cache_dir: str | None
) -> tuple[FeatureSet, FeatureSet]:
    """A client's (train, test) feature sets."""
    return (
        feature_set(clip, kind, data.train, data.train_identity, data.classnames, data.template, cache_dir),
        feature_set(clip, kind, data.test, data.test_identity, data.classnames, data.template, cache_dir),
    )


__all__ = [
    "FeatureSet",
    "clip_of",
    "client_feature_sets",
    "feature_cache_dir",
    "feature_set",
    "frozen_clip",
    "image_features",
    "variant_inputs",
]
