"""ImageNet-LT / Places-LT style folder datasets, on a tiny fabricated folder."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from fedpurel_app.data import DATASETS, Split, folder, load_dataset
from fedpurel_app.data.fedlt import build_fedlt
from fedpurel_app.data.folder import FileSplit, class_order, load_folder_lt, max_feasible_n_max
from fedpurel_app.errors import DataError
from fedpurel_cli.main import folder_stats

NAMES = ["tench", "goldfish", "great white shark"]
# original label -> number of train images: class 2 is the head, class 0 the tail
TRAIN_COUNTS = {0: 2, 1: 3, 2: 5}
TEST_PER_CLASS = 2


def _color(label: int, k: int) -> tuple[int, int, int]:
    return (40 * label + 10, (7 * k + 1) % 256, 200 - 30 * label)


def make_folder(root, prefix="Tiny_LT", classnames=True, test_kind="test", wnids=False):
    """train/<cls>/<k>.png and val/<cls>/<k>.jpg (solid colours) + split lists."""
    lines = {"train": [], test_kind: []}
    for split, sub, ext in (("train", "train", "png"), (test_kind, "val", "jpg")):
        for label in range(3):
            n = TRAIN_COUNTS[label] if split == "train" else TEST_PER_CLASS
            d = root / sub / f"n0000000{label}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                kk = k if split == "train" else 100 + k
                size = (4 + label, 3 + k)  # (w, h): distinct per image
                Image.new("RGB", size, _color(label, kk)).save(d / f"{kk}.{ext}", quality=100)
                lines[split].append(f"{sub}/n0000000{label}/{kk}.{ext} {label}")
    for split, ls in lines.items():
        (root / f"{prefix}_{split}.txt").write_text("\n".join(ls) + "\n")
    if classnames:
        rows = [f"n0000000{i} {n}" if wnids else n for i, n in enumerate(NAMES)]
        (root / "classnames.txt").write_text("\n".join(rows) + "\n")
    return lines


def load_tiny(root, **kw):
    return load_folder_lt("tiny-lt", str(root), "Tiny_LT", 3, **kw)


def test_registered():
    assert {"imagenet-lt", "places-lt"} <= set(DATASETS)
    assert DATASETS.get("imagenet-lt") is folder.load_imagenet_lt
    assert DATASETS.get("places-lt") is folder.load_places_lt


def test_load_relabels_by_train_count(tmp_path):
    lines = make_folder(tmp_path)
    b = load_tiny(tmp_path)
    assert isinstance(b.train, FileSplit) and isinstance(b.train, Split)
    assert len(b.train) == 10 and len(b.test) == 6 and b.pretrain is None
    # new label = rank by train count: original 2 (5 imgs) -> 0, 1 -> 1, 0 -> 2
    assert class_order([0, 0, 1, 1, 1, 2, 2, 2, 2, 2], 3).tolist() == [2, 1, 0]
    assert b.classnames == ("great white shark", "goldfish", "tench")
    assert np.bincount(b.train.labels).tolist() == [5, 3, 2]
    assert np.bincount(b.test.labels).tolist() == [2, 2, 2]
    # pil(i) is the listed image and its label follows the name
    for split, key in ((b.train, "train"), (b.test, "test")):
        for i in range(len(split)):
            rel, orig = lines[key][i].rsplit(maxsplit=1)
            assert split.paths[i] == rel
            assert b.classnames[split.labels[i]] == NAMES[int(orig)]
    im = b.train.pil(3)  # train/n00000000/... ordering: class 0 first -> line 3 is class 1, k=1
    assert im.mode == "RGB" and im.size == (5, 4)
    assert im.getpixel((0, 0)) == _color(1, 1)
    jpg = b.test.pil(5)
    assert jpg.mode == "RGB" and np.allclose(jpg.getpixel((1, 1)), _color(2, 101), atol=3)
    sub = b.train.subset([3, 0])
    assert isinstance(sub, FileSplit) and sub.labels.tolist() == [b.train.labels[3], b.train.labels[0]]
    assert sub.pil(0).getpixel((0, 0)) == _color(1, 1)
    assert len(b.train.subset([])) == 0


def test_fedlt_on_folder_pool(tmp_path):
    make_folder(tmp_path)
    b = load_tiny(tmp_path)
    assert max_feasible_n_max(b.train.labels, 3, 2.5) == 5  # [5, 3, 2] fits exactly
    assert max_feasible_n_max(b.train.labels, 3, 1.0) == 2
    split = build_fedlt(
        b.train.labels,
        b.test.labels,
        3,
        num_clients=2,
        n_max=5,
        imbalance_factor=2.5,
        alpha=1.0,
        min_samples=1,
        client_test_size=4,
        seed=0,
    )
    assert split.class_counts.tolist() == [5, 3, 2] and len(split.train_indices) == 10
    with pytest.raises(DataError, match="lower data.n-max"):
        build_fedlt(
            b.train.labels,
            b.test.labels,
            3,
            num_clients=2,
            n_max=6,
            imbalance_factor=2.5,
            alpha=1.0,
            min_samples=1,
            client_test_size=4,
            seed=0,
        )


def test_wnid_prefix_val_fallback_and_subdir(tmp_path):
    make_folder(tmp_path, test_kind="val", wnids=True)
    sub = tmp_path / "Tiny_LT"
    sub.mkdir()
    os.replace(tmp_path / "Tiny_LT_train.txt", sub / "Tiny_LT_train.txt")
    with pytest.warns(UserWarning, match="Tiny_LT_val.txt"):
        b = load_tiny(tmp_path, subdirs=("Tiny_LT",))
    assert set(b.classnames) == set(NAMES) and len(b.test) == 6


def test_placeholder_names_warn(tmp_path):
    make_folder(tmp_path, classnames=False)
    with pytest.warns(UserWarning, match="placeholder class names"):
        b = load_tiny(tmp_path)
    assert b.classnames == ("class 2", "class 1", "class 0")


def test_registered_imagenet_lt_reads_root(tmp_path):
    make_folder(tmp_path, prefix="ImageNet_LT", classnames=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_dataset("imagenet-lt", str(tmp_path))
    assert b.num_classes == 1000 and b.classnames[:3] == ("class 2", "class 1", "class 0")
    assert np.bincount(b.train.labels).tolist() == [5, 3, 2]


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("root", [None, ""])
def test_error_empty_root(root):
    with pytest.raises(DataError, match="set data.root"):
        load_dataset("places-lt", root)


def test_error_missing_root(tmp_path):
    with pytest.raises(DataError, match="data.root .* does not exist") as e:
        load_dataset("imagenet-lt", str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value)


def test_error_missing_split_file(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("places-lt", str(tmp_path))
    msg = str(e.value)
    for f in ("Places_LT_train.txt", os.path.join("Places_LT_v2", "Places_LT_train.txt")):
        assert os.path.join(str(tmp_path), f) in msg
    os.remove(tmp_path / "Tiny_LT_test.txt")
    with pytest.raises(DataError) as e:
        load_tiny(tmp_path)
    assert "Tiny_LT_test.txt" in str(e.value) and "Tiny_LT_val.txt" in str(e.value)


def test_error_missing_images(tmp_path):
    make_folder(tmp_path)
    os.remove(tmp_path / "train" / "n00000001" / "0.png")
    os.remove(tmp_path / "train" / "n00000002" / "4.png")
    with pytest.raises(DataError) as e:
        load_tiny(tmp_path)
    msg = str(e.value)
    assert "2 of 10 images" in msg and "Tiny_LT_train.txt" in msg
    assert os.path.join(str(tmp_path), "train", "n00000001", "0.png") in msg


def test_error_label_out_of_range(tmp_path):
    make_folder(tmp_path)
    with open(tmp_path / "Tiny_LT_test.txt", "a") as f:
        f.write("val/n00000000/100.jpg 3\n")
    with pytest.raises(DataError, match=r"1 labels outside \[0, 2\].*label 3"):
        load_tiny(tmp_path)


def test_error_bad_line_and_classnames(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "Tiny_LT_train.txt").write_text("train/n00000000/0.png\n")
    with pytest.raises(DataError, match="line 1: expected 'relative/path label'"):
        load_tiny(tmp_path)
    make_folder(tmp_path / "b")
    (tmp_path / "b" / "classnames.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(DataError, match="has 2 names, expected 3"):
        load_tiny(tmp_path / "b")
    (tmp_path / "b" / "classnames.txt").write_text("crane\ngoldfish\ncrane\n")
    with pytest.raises(DataError, match="lines 1 and 3"):
        load_tiny(tmp_path / "b")


def test_cli_reports_feasible_n_max(tmp_path, capsys):
    make_folder(tmp_path, prefix="Places_LT", classnames=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert folder_stats([str(tmp_path), "places-lt", "100"]) == 0
    out = capsys.readouterr().out
    # 365 classes, 362 of them empty: no n-max is feasible
    assert "10 train images" in out and "largest feasible data.n-max = 0" in out


def test_cli_reports_a_data_problem_in_one_line(tmp_path, capsys):
    assert folder_stats([str(tmp_path / "nope"), "imagenet-lt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
