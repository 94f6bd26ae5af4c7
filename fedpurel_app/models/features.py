"""The frozen CLIP (:class:`Clip`) and its features: image embeddings, zero-shot text classifiers, zero-shot logits.

Every function here runs without gradient and returns float32 tensors on the CPU
(features are cached and moved by the caller), whatever device the model is on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Clip",
    "preprocess_images",
    "encode_images",
    "zero_shot_text_features",
    "zero_shot_logits",
]

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass
class Clip:
    """A frozen open_clip model with what is needed to use it."""

    model: torch.nn.Module
    preprocess: Callable  # open_clip eval transform: PIL image -> [3, H, W] tensor
    tokenizer: Callable  # list[str] -> LongTensor [n, context_length]
    name: str
    checkpoint: str  # file path, or the open_clip pretrained tag
    device: torch.device
    logit_scale: float  # exp(model.logit_scale)
    # zero-shot text features by (classnames, templates); dataclasses.replace gives an empty one
    _zero_shot: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def zero_shot_text(
        self, classnames: Sequence[str], template: str | Sequence[str] = DEFAULT_TEMPLATE
    ) -> torch.Tensor:
        """:func:`~fedpurel_app.models.features.zero_shot_text_features` of this model, computed
        once per (classnames, template) and kept on this object (the model is frozen).

        The same tensor is returned on every call: do not modify it in place.
        """
        key = (tuple(classnames), _templates(template))
        if key not in self._zero_shot:
            self._zero_shot[key] = zero_shot_text_features(self, key[0], key[1])
        return self._zero_shot[key]


def _num_images(images: Any) -> int:
    return len(images)


def _pil(images: Any, i: int):
    """The i-th image as a PIL image: ``images.pil(i)`` when the object has it, else ``images[i]``."""
    pil = getattr(images, "pil", None)
    return pil(i) if callable(pil) else images[i]


def preprocess_images(preprocess: Callable, images: Any, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Apply ``preprocess`` (an open_clip transform) to images[start:stop] -> [n, 3, H, W] float32.

    ``images`` is a split (``pil(i)`` and ``len()``) or a sequence of PIL images.
    """
    stop = _num_images(images) if stop is None else stop
    if stop <= start:
        raise ValueError("no images to preprocess")
    return torch.stack([preprocess(_pil(images, i)) for i in range(start, stop)]).float()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(clip: Clip, split: Any, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features [N, D] (float32, CPU) of the frozen image encoder."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = _num_images(split)
    if n == 0:
        raise ValueError("cannot encode an empty split")
    model = clip.model
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        from tqdm import tqdm

        starts = range(0, n, batch_size)
        for start in tqdm(
            starts, desc="image features", unit="batch", disable=None if n >= 4096 else True, leave=False
        ):
            x = preprocess_images(clip.preprocess, split, start, min(start + batch_size, n))
            feats = model.encode_image(x.to(device), normalize=True)
            chunks.append(feats.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def _templates(template: str | Sequence[str]) -> tuple[str, ...]:
    """``template`` (one string or a sequence of them) as a checked tuple of templates."""
    templates = (template,) if isinstance(template, str) else tuple(template)
    if not templates:
        raise ValueError("no template given: use one string or a sequence of strings with '{}'")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(f"template must contain '{{}}' for the class name, got {t!r}")
    return templates


def zero_shot_text_features(
    clip: Clip,
    classnames: Sequence[str],
    template: str | Sequence[str] = "a photo of a {}.",
    classes_per_batch: int | None = None,
) -> torch.Tensor:
    """L2-normalised zero-shot classifier [C, D] (float32, CPU), from open_clip's
    ``build_zero_shot_classifier``: per class, the mean of the normalised text features of
    ``t.format(classname)`` over the templates ``t`` (one string or a sequence of them),
    normalised again. With one template, that is ``encode_text(..., normalize=True)``
    normalised a second time: not bitwise equal to it (max abs difference 3e-8 to 6e-8 measured
    on the tiny model and on ViT-B-32).

    ``classes_per_batch`` classes go through the text encoder at once (all of them if None);
    give a number for large template ensembles. Not cached: :meth:`Clip.zero_shot_text` is.
    """
    import open_clip

    templates = _templates(template)
    classnames = list(classnames)
    if len(classnames) == 0:
        raise ValueError("classnames is empty")
    if classes_per_batch is not None and classes_per_batch < 1:
        raise ValueError(f"classes_per_batch must be >= 1 or None, got {classes_per_batch}")
    model = clip.model
    was_training = model.training
    model.eval()
    try:
        weights = open_clip.build_zero_shot_classifier(
            model,
            clip.tokenizer,
            classnames,
            templates,
            num_classes_per_batch=classes_per_batch,
            device=_model_device(model),
        )  # [D, C], built under torch.no_grad()
    finally:
        model.train(was_training)
    return weights.T.float().cpu().contiguous()


def zero_shot_logits(clip: Clip, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Scaled cosine logits ``exp(logit_scale) * img @ txt.T`` (features assumed normalised).

    Computed on the device of ``image_features``; no gradient flows into the model.
    """
    scale = float(clip.model.logit_scale.detach().exp().reshape(-1)[0])
    txt = text_features.to(device=image_features.device, dtype=image_features.dtype)
    return scale * image_features @ txt.T
