"""Frozen-CLIP features: image embeddings, zero-shot text classifiers, zero-shot logits.

Every function here runs without gradient and returns float32 tensors on the CPU
(features are cached and moved by the caller), whatever device the model is on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .factory import Clip

__all__ = [
    "preprocess_images",
    "encode_images",
    "zero_shot_text_features",
    "zero_shot_logits",
]


def _num_images(images: Any) -> int:
    return len(images)


def _pil(images: Any, i: int):
    """The i-th image as a PIL image: ``images.pil(i)`` when the object has it, else ``images[i]``."""
    pil = getattr(images, "pil", None)
    return pil(i) if callable(pil) else images[i]


def preprocess_images(
    preprocess: Callable, images: Any, start: int = 0, stop: int | None = None
) -> torch.Tensor:
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
def encode_images(clip: "Clip", split: Any, batch_size: int = 256) -> torch.Tensor:
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
        for start in tqdm(starts, desc="image features", unit="batch", disable=n < 4096, mininterval=5):
            x = preprocess_images(clip.preprocess, split, start, min(start + batch_size, n))
            feats = model.encode_image(x.to(device), normalize=True)
            chunks.append(feats.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def zero_shot_text_features(
    clip: "Clip", classnames: Sequence[str], template: str = "a photo of a {}."
) -> torch.Tensor:
    """L2-normalised text features [C, D] (float32, CPU) of ``template.format(classname)``."""
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' for the class name, got {template!r}")
    if len(classnames) == 0:
        raise ValueError("classnames is empty")
    model = clip.model
    device = _model_device(model)
    tokens = clip.tokenizer([template.format(c) for c in classnames]).to(device)
    was_training = model.training
    model.eval()
    try:
        feats = model.encode_text(tokens, normalize=True)
    finally:
        model.train(was_training)
    return feats.float().cpu()


def zero_shot_logits(
    clip: "Clip", image_features: torch.Tensor, text_features: torch.Tensor
) -> torch.Tensor:
    """Scaled cosine logits ``exp(logit_scale) * img @ txt.T`` (features assumed normalised).

    Computed on the device of ``image_features``; no gradient flows into the model.
    """
    scale = float(clip.model.logit_scale.detach().exp().reshape(-1)[0])
    txt = text_features.to(device=image_features.device, dtype=image_features.dtype)
    return scale * image_features @ txt.T
