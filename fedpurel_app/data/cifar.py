"""CIFAR-10-LT and CIFAR-100-LT, read from disk by torchvision's own classes.

``cifar10-lt`` / ``cifar100-lt``
    ``train`` is the full, balanced 50,000-image CIFAR train set: the *pool*
    the long-tailed train set is sampled from by :mod:`.fedlt` (500 images per
    class for CIFAR-100 and 5,000 for CIFAR-10, so ``n-max`` can be up to 500
    / 5000; the usual CIFAR-LT setting is ``data.n-max = 500``, ``data.imbalance-factor
    = 100``). ``test`` is the balanced 10,000-image test set, ``pretrain`` is
    ``None`` (real pretrained CLIP weights are used). Class names come from
    the dataset's own meta file (CIFAR-100's underscores become spaces, e.g.
    ``"aquarium fish"``); the template is ``"a photo of a {}."``. Images are
    uint8 ``[N, 32, 32, 3]`` in an :class:`~.base.ImageSplit`.

On-disk layout (``data.root`` in the run config), i.e. the official python
archives extracted into ``data.root``::

    <data.root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <data.root>/cifar-100-python/{train, test, meta}

Downloading
    Nothing is downloaded unless the environment variable
    ``FEDPUREL_ALLOW_DOWNLOAD=1`` is set (``1``, ``true`` or ``yes``); then
    torchvision downloads and extracts the archive into ``data.root`` when the
    files are missing. Without it, missing files raise
    :class:`CifarNotFoundError` (a :class:`~fedpurel_app.errors.DataError`) naming the
    folder, the expected layout and both fixes. torchvision checks the MD5 sums of
    the files; files that fail the check raise a ``DataError`` saying so.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import DataError
from ..registry import DATASETS
from .base import DEFAULT_TEMPLATE, DatasetBundle, ImageSplit

ALLOW_DOWNLOAD_ENV = "FEDPUREL_ALLOW_DOWNLOAD"
_TRUE = ("1", "true", "yes")

# registry name -> (torchvision class name, human name, folder, required files)
_VARIANTS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "cifar10-lt": (
        "CIFAR10",
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
    ),
    "cifar100-lt": ("CIFAR100", "CIFAR-100", "cifar-100-python", ("train", "test", "meta")),
}


class CifarNotFoundError(DataError, FileNotFoundError):
    """The CIFAR files are not in ``data.root`` and downloading is not allowed."""


def download_allowed() -> bool:
    """True when ``FEDPUREL_ALLOW_DOWNLOAD`` is ``1`` / ``true`` / ``yes``."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in _TRUE


def require_data_root(name: str, root: str | os.PathLike | None, layout: str) -> str:
    """``root`` as an absolute path; a clear :class:`DataError` if it is unset."""
    if root is None or not str(root).strip():
        raise DataError(
            f"dataset {name!r} is read from disk but no data folder was given: "
            f"set data.root in the run config (e.g. --run-config \"data.root='/data'\") "
            f"to the folder that holds {layout}"
        )
    return os.path.abspath(os.path.expanduser(str(root)))


def _missing_files(folder: str, files: tuple[str, ...]) -> list[str]:
    return [f for f in files if not os.path.isfile(os.path.join(folder, f))]


def load_cifar(name: str, root: str | os.PathLike | None, seed: int = 0) -> DatasetBundle:
    """Load ``cifar10-lt`` or ``cifar100-lt`` from ``root`` (``seed`` is unused:
    the pool and test set are the dataset's own fixed splits)."""
    try:
        cls_name, human, folder_name, files = _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown CIFAR variant {name!r}; valid: {sorted(_VARIANTS)}") from None
    root = require_data_root(name, root, f"{folder_name}/")
    folder = os.path.join(root, folder_name)
    missing = _missing_files(folder, files)
    allow = download_allowed()
    if missing and not allow:
        what = "folder does not exist" if not os.path.isdir(folder) else f"missing {', '.join(missing)}"
        raise CifarNotFoundError(
            f"dataset {name!r}: {human} not found in {folder} ({what}); expected the "
            f"extracted official python archive as <data.root>/{folder_name}/"
            f"{{{', '.join(files)}}} with data.root={root}, so either put the extracted "
            f"archive there or set {ALLOW_DOWNLOAD_ENV}=1 on a machine with internet "
            "to let torchvision download it"
        )

    import torchvision.datasets as tvd  # lazy: torchvision is only needed here

    cls = getattr(tvd, cls_name)
    try:
        train = cls(root, train=True, download=bool(missing and allow))
        test = cls(root, train=False, download=False)
    except RuntimeError as e:
        if "corrupted" not in str(e):
            raise
        raise DataError(
            f"dataset {name!r}: the {human} files in {folder} fail torchvision's MD5 "
            "check (corrupted, incomplete or not the official archive); re-extract "
            f"the official archive there or delete the folder and set "
            f"{ALLOW_DOWNLOAD_ENV}=1 to download it again"
        ) from e
    classnames = tuple(str(c).replace("_", " ") for c in train.classes)
    return DatasetBundle(
        name=name,
        classnames=classnames,
        template=DEFAULT_TEMPLATE,
        train=_to_split(train),
        test=_to_split(test),
        pretrain=None,
    )


def _to_split(ds) -> ImageSplit:
    images = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8))
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise RuntimeError(f"unexpected CIFAR image array shape {images.shape}")
    return ImageSplit(images, np.asarray(ds.targets, dtype=np.int64))


@DATASETS.register("cifar10-lt")
def load_cifar10_lt(root: str | None = None, seed: int = 0) -> DatasetBundle:
    """``cifar10-lt``: 10 classes, 50k train pool (5,000 per class), 10k test."""
    return load_cifar("cifar10-lt", root, seed)


@DATASETS.register("cifar100-lt")
def load_cifar100_lt(root: str | None = None, seed: int = 0) -> DatasetBundle:
    """``cifar100-lt``: 100 classes, 50k train pool (500 per class), 10k test."""
    return load_cifar("cifar100-lt", root, seed)
