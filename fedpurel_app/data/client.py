"""One client's data: from its node config to its train and test images.

A node holds either its own folder (node-config ``data-dir``, read by
:mod:`.local`) or its partition of the run's Fed-LT split of the dataset
(:mod:`.fedlt`, every process computes the same split). Either way this
gives a :class:`ClientData`: the two splits, the class names and zero-shot
template, and a string per split naming its samples (for feature caches).

Datasets, splits and class counts do not depend on the process that asks:
each is computed once per process (cached on its arguments, which are
config values).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from ..config import DataConfig, NodeConfig
from ..errors import DataError
from . import load_dataset
from .base import DatasetBundle, Split
from .fedlt import FedLTSplit, build_fedlt, long_tail_counts
from .local import load_node_data, read_node_classes

# The embedded CLIP and the dataset's pretrain/test/train-pool split do not depend
# on the experiment seed: like released CLIP weights, they are fixed.
BACKBONE_SEED = 0


@functools.lru_cache(maxsize=2)
def dataset(name: str, root: str) -> DatasetBundle:
    """The dataset bundle (cached per process)."""
    return load_dataset(name, root or None, seed=BACKBONE_SEED)


def backbone_data(name: str, root: str) -> DatasetBundle:
    """The dataset the embedded CLIP is pretrained on: the dataset's own, or its backbone's
    (a shifted dataset such as mnist-animals-blur uses the CLIP of the images it shifts)."""
    bundle = dataset(name, root)
    return dataset(bundle.backbone, root) if bundle.backbone else bundle


@functools.lru_cache(maxsize=4)
def fedlt_split(data: DataConfig, seed: int, num_clients: int) -> FedLTSplit:
    """The Fed-LT split of ``data`` for ``num_clients`` clients: the same in every process."""
    bundle = dataset(data.name, data.root)
    return build_fedlt(
        bundle.train.labels,
        bundle.test.labels,
        bundle.num_classes,
        num_clients,
        data.n_max,
        data.imbalance_factor,
        data.dirichlet_alpha,
        data.min_client_samples,
        data.client_test_size,
        seed,
    )


def class_counts(data: DataConfig, seed: int) -> np.ndarray:
    """Global long-tailed train count per class (for Many / Medium / Few and the prior)."""
    if data.n_max == 0:  # the pool itself (ImageNet-LT, Places-LT lists)
        return fedlt_split(data, seed, 1).class_counts
    return long_tail_counts(data.n_max, data.imbalance_factor, dataset(data.name, data.root).num_classes)


def classes(data: DataConfig, data_dir: str = "") -> tuple[tuple[str, ...], str]:
    """(class names, zero-shot template) of the run's dataset.

    A node's ``data-dir`` may carry them (its ``dataset.json``), so that a node of
    an on-disk dataset needs none of the dataset's files; else they come from
    the dataset itself.
    """
    if data_dir:
        found = read_node_classes(data_dir, data.name)
        if found is not None:
            return found
    bundle = dataset(data.name, data.root)
    return bundle.classnames, bundle.template


@dataclass(frozen=True, eq=False)
class ClientData:
    """A client's train and test images, what they are (class names, template) and their names."""

    train: Split
    test: Split
    classnames: tuple[str, ...]
    template: str
    train_identity: str  # names the samples, for feature caches
    test_identity: str


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def _files_identity(split, name: str) -> str:
    listing = "\n".join(f"{p} {y}" for p, y in zip(split.paths, split.labels, strict=True))
    return f"node:{split.root}/{name}/{hashlib.sha256(listing.encode()).hexdigest()[:16]}"


def client_data(data: DataConfig, seed: int, node: NodeConfig) -> ClientData:
    """The node's own folder when it has a ``data-dir``, else its partition of the run's Fed-LT
    split; nothing of other clients."""
    names, template = classes(data, node.data_dir)
    prefix = f"{data.name}:{data.root}"
    if node.data_dir:
        train, test = load_node_data(node.data_dir, len(names))
        return ClientData(
            train,
            test,
            names,
            template,
            f"{prefix}/{_files_identity(train, 'train')}",
            f"{prefix}/{_files_identity(test, 'test')}",
        )
    split = fedlt_split(data, seed, node.num_partitions)
    if not 0 <= node.partition_id < node.num_partitions:  # pragma: no cover - NodeConfig checks it
        raise DataError(f"partition-id {node.partition_id} is outside [0, {node.num_partitions - 1}]")
    train_idx, test_idx = split.client_train[node.partition_id], split.client_test[node.partition_id]
    bundle = dataset(data.name, data.root)
    return ClientData(
        bundle.train.subset(train_idx),
        bundle.test.subset(test_idx),
        names,
        template,
        f"{prefix}/train/{_digest(train_idx)}",
        f"{prefix}/test/{_digest(test_idx)}",
    )


def global_test(data: DataConfig) -> ClientData:
    """The balanced global test set (GM evaluation) as the server's "client data" (no train split)."""
    bundle = dataset(data.name, data.root)
    return ClientData(
        bundle.test,
        bundle.test,
        bundle.classnames,
        bundle.template,
        f"{data.name}:{data.root}/test/all",
        f"{data.name}:{data.root}/test/all",
    )


__all__ = [
    "BACKBONE_SEED",
    "ClientData",
    "class_counts",
    "classes",
    "client_data",
    "dataset",
    "fedlt_split",
    "global_test",
]
