"""Core data containers shared by every dataset loader.

Two small, immutable containers:

* :class:`ImageSplit` -- an in-memory split (uint8 images + int64 labels).
  Path-based datasets (e.g. ImageNet-LT) can add another split type with the
  same small interface: ``labels``, ``__len__``, ``pil(i)`` and ``subset``.
* :class:`DatasetBundle` -- everything a run needs from a dataset: class
  names, the zero-shot template, the train *pool* the long-tailed training set
  is drawn from, the balanced test set, and (for the embedded tiny datasets)
  a disjoint balanced ``pretrain`` split plus caption templates used only to
  pretrain the embedded tiny CLIP contrastively.

The dataclasses are ``frozen`` (fields cannot be re-assigned) and use
``eq=False`` (identity comparison, hashable): field-wise ``==`` on numpy arrays
is ambiguous, so value equality is deliberately not generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

DEFAULT_TEMPLATE = "a photo of a {}."


@runtime_checkable
class Split(Protocol):
    """The interface every split type offers (ImageSplit, later path-based)."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def pil(self, i: int) -> Image.Image: ...

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split: ...


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """In-memory images with integer labels.

    images: uint8, ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]`` (RGB).
    labels: int64 ``[N]`` (converted on construction from any integer dtype).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        labels = np.asarray(self.labels)
        if images.dtype != np.uint8:
            raise ValueError(f"ImageSplit.images must be uint8, got {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"ImageSplit.images must have shape [N,H,W] or [N,H,W,3], got {images.shape}")
        if labels.ndim != 1:
            raise ValueError(f"ImageSplit.labels must be 1-D, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"ImageSplit.labels must be integers, got {labels.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"ImageSplit has {len(images)} images but {len(labels)} labels")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def pil(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image (grayscale is replicated to 3 channels)."""
        arr = self.images[int(i)]
        img = Image.fromarray(np.ascontiguousarray(arr))
        return img if img.mode == "RGB" else img.convert("RGB")

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSplit:
        """A new split with the given positions (in the given order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ImageSplit(images=self.images[idx], labels=self.labels[idx])


@dataclass(frozen=True, eq=False)
class DatasetBundle:
    """A dataset ready for the Fed-LT protocol.

    name:       registry name (e.g. ``"mnist"``).
    classnames: one natural-language name per class, in label order.
    template:   zero-shot prompt template with exactly one ``{}``.
    train:      the pool the long-tailed training set is sampled from.
    test:       the balanced test set (global / GM evaluation; client test
                sets are drawn from it).
    pretrain:   a balanced split disjoint from ``train`` and ``test``, used
                only to pretrain the embedded tiny CLIP; ``None`` for datasets
                evaluated with real pretrained CLIP weights.
    captions:   caption templates (each with one ``{}``) for that pretraining.
    backbone:   the dataset whose embedded CLIP this one uses ("" = its own): a shifted
                variant of a dataset shares the CLIP pretrained on the original.
    """

    name: str
    classnames: tuple[str, ...]
    train: Split
    test: Split
    template: str = DEFAULT_TEMPLATE
    pretrain: Split | None = None
    captions: tuple[str, ...] = ()
    backbone: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "captions", tuple(self.captions))
        if not self.classnames:
            raise ValueError(f"dataset {self.name!r}: no class names")
        if len(set(self.classnames)) != len(self.classnames):
            raise ValueError(f"dataset {self.name!r}: class names are not unique")
        for t in (self.template, *self.captions):
            if t.count("{}") != 1:
                raise ValueError(f"dataset {self.name!r}: template/caption {t!r} must contain exactly one '{{}}'")
        c = len(self.classnames)
        splits = {"train": self.train, "test": self.test, "pretrain": self.pretrain}
        for split_name, split in splits.items():
            if split is None or len(split) == 0:
                continue
            lab = np.asarray(split.labels)
            if lab.min() < 0 or lab.max() >= c:
                raise ValueError(
                    f"dataset {self.name!r}: {split_name} labels must lie in "
                    f"[0, {c - 1}], got [{lab.min()}, {lab.max()}]"
                )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self) -> list[str]:
        """The zero-shot prompts, one per class, in label order."""
        return [self.template.format(n) for n in self.classnames]
