"""A SuperNode's own data: the images of one site in a folder of its own (node-config ``data-dir``).

Layout::

    <data-dir>/
        train.txt     # "relative/path label" per line: this node's training images
        test.txt      # the same for its own test images (PM evaluation)
        dataset.json  # optional: {"dataset": name, "classnames": [...], "template": "a photo of a {}."}
        <the listed images, paths relative to data-dir>

Labels use the class order of the run's ``dataset`` (the one the server
evaluates GM on), so a node only needs its images and these two lists, never
the whole dataset and never another node's files. The class names and the
zero-shot template come from ``dataset.json`` when the folder has one, so a
node of an on-disk dataset (CIFAR, ImageNet-LT, Places-LT) needs none of the
dataset's files; without it they come from the run's dataset (the embedded
datasets ship inside packages, so every node has them).

``fedpurel node-data OUT --partition-id I --num-partitions N`` writes such a folder
from one partition of the Fed-LT split of a built-in dataset (for trying a
deployment with the embedded data, or for tests), with :func:`export_split` and
:func:`write_node_classes`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from .folder import FileSplit, read_split_file

SPLITS = ("train", "test")
CLASSES_FILE = "dataset.json"


class NodeDataError(DataError):
    """A node's data-dir is missing, incomplete or inconsistent; the message says what to fix."""


def load_node_data(data_dir: str, num_classes: int) -> tuple[FileSplit, FileSplit]:
    """(train, test) splits of a node's ``data-dir``, every listed image checked to exist."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise NodeDataError(f"node data-dir {str(root)!r} is not a folder; it must hold train.txt and test.txt")
    splits = []
    for name in SPLITS:
        listing = root / f"{name}.txt"
        if not listing.is_file():
            raise NodeDataError(
                f"node data-dir {str(root)!r} has no {name}.txt (lines 'relative/path label', "
                "labels in the class order of the run's dataset)"
            )
        try:
            paths, labels = read_split_file(str(listing))
        except DataError as err:
            raise NodeDataError(str(err)) from None
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(bad):
            raise NodeDataError(
                f"{listing}: label {int(labels[bad[0]])} of {paths[bad[0]]!r} is outside [0, {num_classes - 1}] "
                f"(the run's dataset has {num_classes} classes)"
            )
        escaping = [p for p in paths if not (root / p).resolve().is_relative_to(root.resolve())]
        if escaping:
            raise NodeDataError(f"{listing}: {escaping[0]!r} points outside the data-dir")
        missing = [p for p in paths if not (root / p).is_file()]
        if missing:
            raise NodeDataError(
                f"{listing}: {len(missing)} of {len(paths)} listed images are missing "
                f"(first: {root / missing[0]}); paths are relative to the data-dir"
            )
        splits.append(FileSplit(str(root), np.asarray(paths), labels))
    return splits[0], splits[1]


def read_node_classes(data_dir: str, dataset: str) -> tuple[tuple[str, ...], str] | None:
    """(class names, zero-shot template) from a node data-dir's ``dataset.json``; None without one.

    The file must name the run's ``dataset``: a folder written for another
    dataset would label its images in another class order.
    """
    path = Path(data_dir).expanduser() / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise NodeDataError(f"{path}: not readable JSON ({err}); rewrite it or remove it") from None
    meta = meta if isinstance(meta, dict) else {}
    names, template = meta.get("classnames"), meta.get("template")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
        or not isinstance(template, str)
        or template.count("{}") != 1
    ):
        raise NodeDataError(
            f'{path}: expected {{"dataset": name, "classnames": [distinct names], '
            f'"template": "... {{}} ..."}}; rewrite it with `fedpurel node-data` or remove it'
        )
    if meta.get("dataset") != dataset:
        raise NodeDataError(
            f"{path}: the folder was written for dataset {meta.get('dataset')!r}, but the run uses {dataset!r} "
            "(its labels follow that dataset's class order); give this node a data-dir for the run's dataset"
        )
    return tuple(names), template


def write_node_classes(out: Path, dataset: str, classnames: Sequence[str], template: str) -> None:
    """Write ``out/dataset.json``: the dataset's name, class names and zero-shot template."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": dataset, "classnames": list(classnames), "template": template}
    (out / CLASSES_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def export_split(split, out: Path, name: str) -> int:
    """Write a split's images as PNGs under ``out/name/`` and ``out/name.txt``; returns the count."""
    (out / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(len(split)):
        rel = f"{name}/{i:06d}.png"
        split.pil(i).save(out / rel)
        lines.append(f"{rel} {int(split.labels[i])}")
    (out / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return len(lines)
