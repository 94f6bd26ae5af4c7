"""ImageNet-LT and Places-LT from a local image folder and the standard split lists.

``imagenet-lt`` (1,000 classes) / ``places-lt`` (365 classes)

Layout (``data.root`` in the run config)::

    <data.root>/
        ImageNet_LT_train.txt      # "relative/path label" per line
        ImageNet_LT_test.txt       # or ImageNet_LT_val.txt (used if no _test)
        classnames.txt             # optional, one class name per line
        train/n01440764/n01440764_10026.JPEG ...   # the paths in the lists
        val/...

(``Places_LT_train.txt`` / ``Places_LT_test.txt`` / ``Places_LT_val.txt`` for
Places-LT.) The split files are looked for in ``<data.root>`` and then in
``<data.root>/ImageNet_LT`` (``Places_LT``, ``Places_LT_v2``). Image paths in
the lists are relative to ``<data.root>`` (a leading ``/`` is ignored).
Every listed image must exist; images are opened lazily, one at a time, by
:meth:`FileSplit.pil`. The test list is ``*_test.txt`` (ImageNet-LT: 50 per
class, Places-LT: 100 per class); ``*_val.txt`` is used only when there is no
test list (with a warning).

Class names
    ``<data.root>/classnames.txt``: one name per line in the lists' label
    order (label 0 first). A leading WordNet id (``n01440764 tench``) is
    dropped. None ships with fedpurel: provide the real names (ImageNet-LT
    uses the standard ImageNet-1k classes in the usual label order; Places-LT
    the Places365 categories), names must be unique (the raw ImageNet-1k list
    has two "crane" and two "maillot": use a disambiguated list). Without the
    file the names are placeholders ``"class 0"``, ``"class 1"``, ... with a
    warning, which makes zero-shot CLIP meaningless.

Train pool and the Fed-LT sampling (the behaviour chosen)
    The pool (``bundle.train``) is the dataset's own, already long-tailed
    train list, exactly as listed. :func:`.fedlt.build_fedlt` then samples the
    federated LT train set from that pool as for every other dataset, with
    ``n_c = floor(n-max * IF^(-c/(C-1)))`` for class ``c``. So that this
    exponential profile can fit under the pool's counts, **labels are
    renumbered by decreasing train count**: label 0 is the class with the most
    train images, label C-1 the one with the fewest (ties: lower original
    label first). Class names, train and test labels are all renumbered
    consistently, so names always match; :func:`class_order` gives the
    original label of each new label. The user must pick an ``n-max`` that
    the pool can supply for the chosen ``data.imbalance-factor``::

        python -m fedpurel_app.data.folder <data.root> imagenet-lt 100

    prints the pool's counts and the largest feasible ``n-max`` for IF 100
    (:func:`max_feasible_n_max`); an infeasible one makes ``build_fedlt``
    fail with a message naming the class that runs short. The standard
    ImageNet-LT / Places-LT groups are Many > 100, Few < 20 train images:
    ``data.many-threshold = 100``, ``data.few-threshold = 19`` (groups are computed
    from the re-sampled counts, not the pool's).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DataError
from ..registry import DATASETS
from .base import DEFAULT_TEMPLATE, DatasetBundle
from .cifar import require_data_root
from .fedlt import long_tail_counts

CLASSNAMES_FILE = "classnames.txt"

# registry name -> (split-file prefix, number of classes, extra sub-folders to search)
FOLDER_DATASETS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "imagenet-lt": ("ImageNet_LT", 1000, ("ImageNet_LT",)),
    "places-lt": ("Places_LT", 365, ("Places_LT", "Places_LT_v2")),
}

_WNID = re.compile(r"^n\d{8}\s+")


@dataclass(frozen=True, eq=False)
class FileSplit:
    """Images on disk (paths relative to ``root``) with integer labels.

    Same small interface as :class:`~.base.ImageSplit` (``labels``,
    ``__len__``, ``pil(i)``, ``subset``): a :class:`~.base.Split`.
    """

    root: str
    paths: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        paths = np.asarray(self.paths, dtype=str).reshape(-1)
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(f"FileSplit.labels must be 1-D, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"FileSplit.labels must be integers, got {labels.dtype}")
        if len(paths) != len(labels):
            raise ValueError(f"FileSplit has {len(paths)} paths but {len(labels)} labels")
        object.__setattr__(self, "root", str(self.root))
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, i: int) -> str:
        """Absolute path of image ``i``."""
        return os.path.join(self.root, str(self.paths[int(i)]))

    def pil(self, i: int) -> Image.Image:
        """Image ``i`` read from disk as an RGB PIL image (file closed afterwards)."""
        with Image.open(self.path(i)) as img:
            return img.convert("RGB")

    def subset(self, indices: Sequence[int] | np.ndarray) -> FileSplit:
        """A new split with the given positions (in the given order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return FileSplit(self.root, self.paths[idx], self.labels[idx])


def _relative(path: str) -> str:
    return path.replace("\\", "/").lstrip("/")


def read_split_file(path: str) -> tuple[list[str], np.ndarray]:
    """Parse a split list: one ``relative/path label`` per line (blank lines skipped)."""
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError
                labels.append(int(parts[1]))
            except ValueError:
                raise DataError(f"{path}: line {lineno}: expected 'relative/path label', got {line!r}") from None
            paths.append(_relative(parts[0]))
    if not paths:
        raise DataError(f"{path}: the split file lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def _find_split_file(name: str, root: str, prefix: str, subdirs: tuple[str, ...], kinds: tuple[str, ...]) -> str:
    dirs = [root] + [os.path.join(root, d) for d in subdirs]
    tried = []
    for kind in kinds:
        for d in dirs:
            p = os.path.join(d, f"{prefix}_{kind}.txt")
            if os.path.isfile(p):
                return p
            tried.append(p)
    raise DataError(
        f"dataset {name!r}: no {'/'.join(kinds)} split file found; looked for "
        + ", ".join(tried)
        + f" (lines 'relative/path label', paths relative to data.root={root})"
    )


def _check_split(name: str, root: str, split_file: str, paths: list[str], labels: np.ndarray, c: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= c))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"dataset {name!r}: {split_file}: {len(bad)} labels outside [0, {c - 1}] "
            f"({name} has {c} classes); first: {paths[i]!r} has label {int(labels[i])}"
        )
    missing = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise DataError(
            f"dataset {name!r}: {len(missing)} of {len(paths)} images listed in "
            f"{split_file} are missing under data.root={root} (first missing: "
            f"{os.path.join(root, missing[0])}); data.root must be the folder the "
            "listed paths are relative to"
        )


def read_classnames(name: str, root: str, num_classes: int) -> tuple[str, ...]:
    """Class names from ``<root>/classnames.txt`` (label order) or placeholders."""
    path = os.path.join(root, CLASSNAMES_FILE)
    if not os.path.isfile(path):
        warnings.warn(
            f"dataset {name!r}: {path} not found, using placeholder class names "
            f"'class 0' ... 'class {num_classes - 1}' (zero-shot CLIP needs the real "
            "names: provide classnames.txt, one name per line in label order)",
            stacklevel=3,
        )
        return tuple(f"class {i}" for i in range(num_classes))
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f.read().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    names = [_WNID.sub("", ln).strip() for ln in lines]
    if len(names) != num_classes:
        raise DataError(
            f"dataset {name!r}: {path} has {len(names)} names, expected {num_classes} (one per line, in label order)"
        )
    empty = [i + 1 for i, n in enumerate(names) if not n]
    if empty:
        raise DataError(f"dataset {name!r}: {path}: empty class name on line {empty[0]}")
    first: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in first:
            raise DataError(
                f"dataset {name!r}: {path}: class name {n!r} appears on lines "
                f"{first[n] + 1} and {i + 1}; class names must be unique"
            )
        first[n] = i
    return tuple(names)


def class_order(train_labels: np.ndarray | Sequence[int], num_classes: int) -> np.ndarray:
    """Original labels sorted by decreasing train count (ties: lower label first).

    ``class_order(...)[new_label] = original_label``.
    """
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_classes)
    return np.argsort(-counts, kind="stable").astype(np.int64)


def max_feasible_n_max(pool_labels: np.ndarray | Sequence[int], num_classes: int, imbalance_factor: float) -> int:
    """Largest ``n-max`` for which :func:`.fedlt.long_tail_counts` fits the pool
    (every class ``c`` asks for at most as many images as the pool has).
    0 if none does (a class has no pool image)."""
    have = np.bincount(np.asarray(pool_labels, dtype=np.int64), minlength=num_classes)
    lo, hi = 0, int(have.max()) if have.size else 0
    while lo < hi:  # long_tail_counts is monotone in n_max
        mid = (lo + hi + 1) // 2
        if np.all(long_tail_counts(mid, imbalance_factor, num_classes) <= have):
            lo = mid
        else:
            hi = mid - 1
    return lo


def load_folder_lt(
    name: str,
    root: str | os.PathLike | None,
    prefix: str,
    num_classes: int,
    subdirs: tuple[str, ...] = (),
) -> DatasetBundle:
    """Load an LT dataset from ``root`` with split lists ``<prefix>_train.txt``
    and ``<prefix>_test.txt`` (or ``_val``); labels renumbered by decreasing
    train count (see the module doc)."""
    root = require_data_root(name, root, f"{prefix}_train.txt, {prefix}_test.txt and the images")
    if not os.path.isdir(root):
        raise DataError(
            f"dataset {name!r}: data.root {root} does not exist; set data.root to the "
            f"folder that holds {prefix}_train.txt, {prefix}_test.txt and the images"
        )
    train_file = _find_split_file(name, root, prefix, subdirs, ("train",))
    test_file = _find_split_file(name, root, prefix, subdirs, ("test", "val"))
    if test_file.endswith("_val.txt"):
        warnings.warn(f"dataset {name!r}: no {prefix}_test.txt, evaluating on {test_file}", stacklevel=3)
    classnames = read_classnames(name, root, num_classes)
    tr_paths, tr_labels = read_split_file(train_file)
    te_paths, te_labels = read_split_file(test_file)
    _check_split(name, root, train_file, tr_paths, tr_labels, num_classes)
    _check_split(name, root, test_file, te_paths, te_labels, num_classes)
    order = class_order(tr_labels, num_classes)
    new_of_old = np.empty(num_classes, dtype=np.int64)
    new_of_old[order] = np.arange(num_classes)
    return DatasetBundle(
        name=name,
        classnames=tuple(classnames[o] for o in order),
        template=DEFAULT_TEMPLATE,
        train=FileSplit(root, tr_paths, new_of_old[tr_labels]),
        test=FileSplit(root, te_paths, new_of_old[te_labels]),
        pretrain=None,
    )


@DATASETS.register("imagenet-lt")
def load_imagenet_lt(root: str | None = None, seed: int = 0) -> DatasetBundle:
    """``imagenet-lt``: 1,000 classes; the ImageNet-LT train list is the pool."""
    prefix, c, sub = FOLDER_DATASETS["imagenet-lt"]
    return load_folder_lt("imagenet-lt", root, prefix, c, sub)


@DATASETS.register("places-lt")
def load_places_lt(root: str | None = None, seed: int = 0) -> DatasetBundle:
    """``places-lt``: 365 classes; the Places-LT train list is the pool."""
    prefix, c, sub = FOLDER_DATASETS["places-lt"]
    return load_folder_lt("places-lt", root, prefix, c, sub)
