"""CIFAR-10/100-LT loaders, on small copies fabricated in torchvision's exact
on-disk format and read through the real torchvision classes.

Only torchvision's MD5 comparison is bypassed: ``check_integrity`` is replaced
by a plain "file exists" test, so missing files still count as missing.
"""

import os
import pickle

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.utils as tv_utils

from fedpurel_app.data import DATASETS, ImageSplit, Split, cifar, load_dataset
from fedpurel_app.data.fedlt import build_fedlt
from fedpurel_app.errors import DataError, UserError

C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
C100_NAMES = [f"name_{i}" if i % 2 else f"class{i}" for i in range(100)]
C100_NAMES[1] = "aquarium_fish"
C100_NAMES[3] = "maple_tree"


def _pattern(offset: int, n: int) -> np.ndarray:
    """Known HWC uint8 images: pixel (r, c) of image i (global index offset+i) is
    (R, G, B) = ((i + r) % 256, (3 * i + c) % 256, (i * r + c) % 256)."""
    i = np.arange(offset, offset + n)[:, None, None]
    r = np.arange(32)[None, :, None]
    c = np.arange(32)[None, None, :]
    red = (i + r + 0 * c) % 256
    green = (3 * i + c + 0 * r) % 256
    blue = (i * r + c) % 256
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> CIFAR rows [N, 3072]: the 1024 R values, then G, then B."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _dump(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root, per_class_train=20, per_class_test=4):
    """A small CIFAR-10 copy: 5 train batches + test batch + batches.meta."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    n = 10 * per_class_train
    labels = np.arange(n) % 10
    images = _pattern(0, n)
    for b in range(5):
        sl = slice(b * n // 5, (b + 1) * n // 5)
        _dump(
            d / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": labels[sl].tolist(),
                "data": _rows(images[sl]),
                "filenames": [f"img_{i}.png" for i in range(sl.start, sl.stop)],
            },
        )
    nt = 10 * per_class_test
    t_labels = (np.arange(nt) * 3) % 10
    t_images = _pattern(1000, nt)
    _dump(
        d / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": t_labels.tolist(),
            "data": _rows(t_images),
            "filenames": [f"t_{i}.png" for i in range(nt)],
        },
    )
    _dump(d / "batches.meta", {"num_cases_per_batch": n // 5, "label_names": C10_NAMES, "num_vis": 3072})
    return images, labels, t_images, t_labels


def make_cifar100(root, per_class_train=3, per_class_test=1):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    n, nt = 100 * per_class_train, 100 * per_class_test
    labels, t_labels = np.arange(n) % 100, (np.arange(nt) * 7) % 100
    images, t_images = _pattern(0, n), _pattern(5000, nt)
    for fname, im, lab in (("train", images, labels), ("test", t_images, t_labels)):
        _dump(
            d / fname,
            {
                "filenames": [f"{fname}_{i}.png" for i in range(len(lab))],
                "batch_label": f"{fname} batch",
                "fine_labels": lab.tolist(),
                "coarse_labels": (lab // 5).tolist(),
                "data": _rows(im),
            },
        )
    _dump(d / "meta", {"fine_label_names": C100_NAMES, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return images, labels, t_images, t_labels


@pytest.fixture
def no_md5(monkeypatch):
    """Skip only the MD5 comparison (existence is still checked)."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to download."""

    def boom(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", boom)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", boom)
    monkeypatch.setattr(tv_utils, "download_url", boom)
    monkeypatch.delenv(cifar.ALLOW_DOWNLOAD_ENV, raising=False)


def test_registered():
    assert {"cifar10-lt", "cifar100-lt"} <= set(DATASETS)
    assert DATASETS.get("cifar10-lt") is cifar.load_cifar10_lt
    assert DATASETS.get("cifar100-lt") is cifar.load_cifar100_lt


def test_cifar10_round_trip(tmp_path, no_md5, no_network):
    images, labels, t_images, t_labels = make_cifar10(tmp_path)
    b = load_dataset("cifar10-lt", str(tmp_path))
    assert b.name == "cifar10-lt" and b.classnames == tuple(C10_NAMES)
    assert b.template == "a photo of a {}." and b.pretrain is None
    assert isinstance(b.train, ImageSplit) and isinstance(b.train, Split)
    assert b.train.images.shape == (200, 32, 32, 3) and b.train.images.dtype == np.uint8
    assert b.test.images.shape == (40, 32, 32, 3)
    assert np.array_equal(b.train.images, images) and b.train.labels.tolist() == labels.tolist()
    assert np.array_equal(b.test.images, t_images) and b.test.labels.tolist() == t_labels.tolist()
    # one pixel spelled out: image 37, row 5, col 9 -> (42, 120, 194)
    assert b.train.images[37, 5, 9].tolist() == [42, 120, (37 * 5 + 9) % 256]
    assert np.array_equal(np.asarray(b.train.pil(37)), images[37])
    split = build_fedlt(
        b.train.labels,
        b.test.labels,
        b.num_classes,
        num_clients=3,
        n_max=20,
        imbalance_factor=10,
        alpha=1.0,
        min_samples=2,
        client_test_size=8,
        seed=0,
    )
    assert split.class_counts.tolist() == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert sorted(np.concatenate(split.client_train).tolist()) == split.train_indices.tolist()
    assert all(len(t) > 0 for t in split.client_test)
    sub = b.train.subset(split.client_train[0])
    assert np.array_equal(sub.images, images[split.client_train[0]])


def test_cifar100_round_trip(tmp_path, no_md5, no_network):
    images, labels, t_images, t_labels = make_cifar100(tmp_path)
    b = load_dataset("cifar100-lt", str(tmp_path))
    assert b.num_classes == 100
    assert b.classnames[1] == "aquarium fish" and b.classnames[3] == "maple tree"
    assert b.classnames[0] == "class0" and b.classnames[5] == "name 5"
    assert b.train.images.shape == (300, 32, 32, 3) and b.test.images.shape == (100, 32, 32, 3)
    assert np.array_equal(b.train.images, images) and np.array_equal(b.test.images, t_images)
    assert b.train.labels.tolist() == labels.tolist()  # fine labels, not coarse
    assert b.test.labels.tolist() == t_labels.tolist()
    assert b.prompts()[1] == "a photo of a aquarium fish."
    split = build_fedlt(
        b.train.labels,
        b.test.labels,
        100,
        num_clients=2,
        n_max=3,
        imbalance_factor=3,
        alpha=1.0,
        min_samples=5,
        client_test_size=10,
        seed=1,
    )
    assert split.class_counts[0] == 3 and split.class_counts[-1] == 1
    assert len(split.train_indices) == split.class_counts.sum()


def test_missing_folder_no_download(tmp_path, no_md5, no_network):
    for name, folder, some_file in (
        ("cifar100-lt", "cifar-100-python", "meta"),
        ("cifar10-lt", "cifar-10-batches-py", "batches.meta"),
    ):
        with pytest.raises(FileNotFoundError) as e:
            load_dataset(name, str(tmp_path))
        msg = str(e.value)
        assert isinstance(e.value, cifar.CifarNotFoundError) and isinstance(e.value, UserError)
        assert os.path.join(str(tmp_path), folder) in msg
        assert f"<data.root>/{folder}/" in msg and some_file in msg
        assert "FEDPUREL_ALLOW_DOWNLOAD=1" in msg and "extracted" in msg
    assert not any(tmp_path.iterdir())  # nothing was created


def test_partially_missing_names_files(tmp_path, no_md5, no_network):
    make_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        load_dataset("cifar10-lt", str(tmp_path))


@pytest.mark.parametrize("root", [None, "", "  "])
def test_empty_root(root, no_network):
    with pytest.raises(DataError, match="set data.root in the run config"):
        load_dataset("cifar100-lt", root)


def test_md5_failure_is_explained(tmp_path, no_network):
    make_cifar10(tmp_path)  # fabricated files: the real MD5 check fails
    with pytest.raises(DataError, match="fail torchvision's MD5 check"):
        load_dataset("cifar10-lt", str(tmp_path))


def test_download_only_when_allowed(tmp_path, monkeypatch, no_md5):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, download_root, filename))
        make_cifar100(tmp_path / "dl")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    monkeypatch.setenv(cifar.ALLOW_DOWNLOAD_ENV, "0")
    with pytest.raises(FileNotFoundError):
        load_dataset("cifar100-lt", str(tmp_path / "dl"))
    assert calls == []
    monkeypatch.setenv(cifar.ALLOW_DOWNLOAD_ENV, "1")
    b = load_dataset("cifar100-lt", str(tmp_path / "dl"))
    assert len(calls) == 1 and calls[0][0].endswith("cifar-100-python.tar.gz")
    assert calls[0][1] == str(tmp_path / "dl") and len(b.train) == 300
    load_dataset("cifar100-lt", str(tmp_path / "dl"))  # files present: no second download
    assert len(calls) == 1
