"""Datasets and the Fed-LT data protocol.

Each dataset is a loader ``(root, seed) -> DatasetBundle`` registered, in its
own module, with :data:`fedpurel_app.registry.DATASETS`;
:func:`load_dataset` looks one up by the run config's ``data.name``.
:mod:`.fedlt` is the protocol (long tail, Dirichlet split, client test sets),
:mod:`.local` a node's own data folder, :mod:`.client` one client's data.
"""

from __future__ import annotations

from ..errors import DataError
from ..registry import DATASETS
from .base import DEFAULT_TEMPLATE, DatasetBundle, ImageSplit, Split


def load_dataset(name: str, root: str | None = None, seed: int = 0) -> DatasetBundle:
    """Load a dataset by registry name; ``root`` is its data directory (ignored
    by embedded datasets), ``seed`` fixes its pretrain/test/train split."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS.names()))}")
    return DATASETS.get(name)(root, seed)


__all__ = ["DATASETS", "DEFAULT_TEMPLATE", "DatasetBundle", "ImageSplit", "Split", "load_dataset"]
