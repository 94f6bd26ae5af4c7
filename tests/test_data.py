"""Tests for the dataset containers and the embedded datasets."""

import numpy as np
import pytest
from PIL import Image

from fedpurel_app.data import DATASETS, DatasetBundle, ImageSplit, embedded, load_dataset
from fedpurel_app.errors import DataError, UserError


def _animal_mnist_installed() -> bool:
    try:
        embedded.animal_mnist_files()
        return True
    except DataError:
        return False


# ---------------------------------------------------------------- containers
def test_image_split_basics():
    imgs = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    s = ImageSplit(imgs, np.array([3, 1, 2, 0], dtype=np.int32))
    assert len(s) == 4 and s.labels.dtype == np.int64
    im = s.pil(2)
    assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (6, 5)
    rgb = np.asarray(im)
    assert np.array_equal(rgb[..., 0], imgs[2]) and np.array_equal(rgb[..., 2], imgs[2])
    sub = s.subset([3, 0])
    assert sub.labels.tolist() == [0, 3] and np.array_equal(sub.images[0], imgs[3])
    col = ImageSplit(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]))
    assert col.pil(1).mode == "RGB"
    with pytest.raises(ValueError):
        ImageSplit(imgs.astype(np.float32), np.zeros(4, int))
    with pytest.raises(ValueError):
        ImageSplit(imgs, np.zeros(3, int))


def test_bundle_validation():
    s = ImageSplit(np.zeros((2, 3, 3), np.uint8), np.array([0, 1]))
    b = DatasetBundle(name="x", classnames=("a", "b"), train=s, test=s)
    assert b.num_classes == 2 and b.template == "a photo of a {}." and b.pretrain is None
    with pytest.raises(ValueError):
        DatasetBundle(name="x", classnames=("a", "b"), train=s, test=s, template="no slot")
    with pytest.raises(ValueError):
        DatasetBundle(name="x", classnames=("a",), train=s, test=s)  # label 1 out of range


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as e:
        load_dataset("no-such-set")
    assert "mnist" in str(e.value) and "mnist-animals" in str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    assert {"mnist", "mnist-animals"} <= set(DATASETS)


# ---------------------------------------------------------------- embedded
def _check_embedded(b, source_images, source_labels, num_classes, seed):
    assert b.num_classes == num_classes == len(set(b.classnames))
    assert b.template.count("{}") == 1 and len(b.captions) >= 3
    assert all(c.count("{}") == 1 for c in b.captions)
    for split, n in ((b.pretrain, 250), (b.test, 100), (b.train, 150)):
        assert split.images.shape == (n * num_classes, 28, 28)
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
        assert np.bincount(split.labels, minlength=num_classes).tolist() == [n] * num_classes
    assert b.train.pil(0).mode == "RGB" and b.train.pil(0).size == (28, 28)
    # index bookkeeping: each split is exactly source[idx] for disjoint idx sets
    pre, test, train = embedded.embedded_split(source_labels, seed)
    assert len(np.intersect1d(pre, test)) == 0
    assert len(np.intersect1d(pre, train)) == 0
    assert len(np.intersect1d(test, train)) == 0
    for split, idx in ((b.pretrain, pre), (b.test, test), (b.train, train)):
        assert np.array_equal(split.images, source_images[idx])
        assert np.array_equal(split.labels, source_labels[idx])
    # and no identical image is shared between two splits
    keys = [{im.tobytes() for im in s.images} for s in (b.pretrain, b.test, b.train)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


def test_mnist_embedded():
    b = load_dataset("mnist", seed=0)
    src_img, src_lab = embedded.mnist_source()
    assert src_img.shape == (5000, 28, 28)
    assert np.bincount(src_lab).tolist() == [500] * 10
    assert src_img.max() > 200  # real digits, white on black
    assert b.name == "mnist"
    assert b.classnames == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert b.prompts()[3] == "a photo of the digit three."
    _check_embedded(b, src_img, src_lab, 10, 0)
    # deterministic for the seed, different for another seed
    b2 = load_dataset("mnist", seed=0)
    b3 = load_dataset("mnist", seed=1)
    assert np.array_equal(b.train.images, b2.train.images)
    assert not np.array_equal(b.train.images, b3.train.images)
    _check_embedded(b3, src_img, src_lab, 10, 1)


def test_mnist_animals_or_clear_error(monkeypatch):
    if _animal_mnist_installed():
        b = load_dataset("mnist-animals", seed=0)
        src_img, src_lab = embedded.mnist_animals_source(0)
        assert src_img.shape == (10000, 28, 28)
        assert np.bincount(src_lab).tolist() == [500] * 20
        assert b.classnames[:4] == ("digit zero", "bear", "digit one", "bird")
        assert b.classnames[-1] == "zebra" and b.template == "a photo of a {}."
        # digits keep their MNIST images: even labels come from MNIST-5k
        d_img, d_lab = embedded.mnist_source()
        assert np.array_equal(src_img[:5000], d_img) and np.array_equal(src_lab[:5000], 2 * d_lab)
        _check_embedded(b, src_img, src_lab, 20, 0)
    # simulate a missing package (always tested): the error names the package
    monkeypatch.setattr(embedded, "_package_dir", lambda module: None)
    with pytest.raises(DataError) as e:
        load_dataset("mnist-animals")
    assert "animal-mnist" in str(e.value) and "pip install" in str(e.value)
    assert isinstance(e.value, UserError), "a missing package is the user's to fix: one message, no traceback"


# ---------------------------------------------------------------- one client's data (data/client.py)
def test_client_data_is_the_nodes_partition_of_the_run_split():
    from fedpurel_app.config import NodeConfig
    from fedpurel_app.data import client
    from fedpurel_app.data.fedlt import long_tail_counts
    from tests.conftest import make_cfg

    cfg = make_cfg({"data.name": "mnist", "data.n-max": 40, "data.imbalance-factor": 10.0, "data.client-test-size": 20})
    bundle = client.dataset("mnist", "")
    assert client.dataset("mnist", "") is bundle, "cached per process"
    counts = client.class_counts(cfg.data, cfg.seed)
    assert counts.tolist() == long_tail_counts(40, 10.0, 10).tolist()
    split = client.fedlt_split(cfg.data, cfg.seed, 3)
    parts = [client.client_data(cfg.data, cfg.seed, NodeConfig(partition_id=k, num_partitions=3)) for k in range(3)]
    assert sum(len(p.train) for p in parts) == int(counts.sum())
    for k, part in enumerate(parts):
        assert np.array_equal(part.train.labels, bundle.train.labels[split.client_train[k]])
        assert np.array_equal(part.test.labels, bundle.test.labels[split.client_test[k]])
        assert len(part.test) <= 20 and part.classnames == bundle.classnames and part.template == bundle.template
    assert len({p.train_identity for p in parts}) == 3 and len({p.test_identity for p in parts}) == 3
    # Another seed is another split, and so other sample identities.
    other = client.client_data(cfg.data, 1, NodeConfig(partition_id=0, num_partitions=3))
    assert other.train_identity != parts[0].train_identity
    server = client.global_test(cfg.data)
    assert len(server.test) == len(bundle.test) and server.classnames == bundle.classnames
