"""Datasets and the Fed-LT data protocol.

``load_dataset(name, root=None, seed=0)`` looks ``name`` up in
:data:`DATASETS` (name -> loader ``(root, seed) -> DatasetBundle``).
Other loaders (e.g. CIFAR) register with :func:`register_dataset`.
"""

from __future__ import annotations

from typing import Callable

from .base import DEFAULT_TEMPLATE, DatasetBundle, ImageSplit, Split
from .embedded import load_mnist, load_mnist_animals
from .cifar import load_cifar10_lt, load_cifar100_lt
from .folder import load_imagenet_lt, load_places_lt
from .fedlt import (
    FedLTSplit,
    build_fedlt,
    client_test_indices,
    dirichlet_split,
    long_tail_counts,
    sample_long_tail,
)

Loader = Callable[[str | None, int], DatasetBundle]

DATASETS: dict[str, Loader] = {
    "mnist": load_mnist,
    "mnist-animals": load_mnist_animals,
    "cifar10-lt": load_cifar10_lt,
    "cifar100-lt": load_cifar100_lt,
    "imagenet-lt": load_imagenet_lt,
    "places-lt": load_places_lt,
}


def register_dataset(name: str, loader: Loader) -> None:
    """Add (or replace) a dataset loader ``loader(root, seed) -> DatasetBundle``."""
    DATASETS[name] = loader


def load_dataset(name: str, root: str | None = None, seed: int = 0) -> DatasetBundle:
    """Load a dataset by registry name; ``root`` is its data directory (ignored
    by embedded datasets), ``seed`` fixes its pretrain/test/train split."""
    try:
        loader = DATASETS[name]
    except KeyError:
        valid = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; valid names: {valid}") from None
    return loader(root, seed)


__all__ = [
    "DATASETS",
    "DEFAULT_TEMPLATE",
    "DatasetBundle",
    "FedLTSplit",
    "ImageSplit",
    "Split",
    "build_fedlt",
    "client_test_indices",
    "dirichlet_split",
    "load_dataset",
    "load_mnist",
    "load_mnist_animals",
    "long_tail_counts",
    "register_dataset",
    "sample_long_tail",
]
