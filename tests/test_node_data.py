"""A SuperNode's own data folder (node-config data-dir) and its feature cache in the state-dir."""

import os

import numpy as np
import pytest
import torch

from fedpurel_app.client import Client
from fedpurel_app.config import NodeConfig, NodeConfigError, parse_node_config
from fedpurel_app.data import client as data_client
from fedpurel_app.data.client import classes, client_data, dataset
from fedpurel_app.data.local import NodeDataError, load_node_data, read_node_classes
from fedpurel_app.inputs import client_feature_sets, clip_of, feature_cache_dir
from fedpurel_app.peft.base import build_peft
from fedpurel_app.protocol import Instruction
from fedpurel_cli.main import main as fedpurel
from tests.conftest import SMALL_RUN, make_cfg


class DictMemory(dict):
    """A node's memory (Flower's context.state in the ClientApp) in a dict."""

    def put(self, name, tensors):
        self[name] = {k: v.detach().cpu().clone() for k, v in tensors.items()}

    def drop(self, name):
        self.pop(name, None)

    def names(self):
        return list(self)


def node(partition_id=1, num_partitions=4, **extra):
    return NodeConfig(partition_id=partition_id, num_partitions=num_partitions, **extra)


def feature_sets(cfg, data):
    return client_feature_sets(clip_of(cfg.model, cfg.data), "features", data, feature_cache_dir(cfg.model))


def overrides(run):
    """``--set key=value`` arguments of ``fedpurel node-data`` (TOML values)."""
    return [arg for k, v in run.items() for arg in ("--set", f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")]


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory, small_cfg):
    out = tmp_path_factory.mktemp("node") / "data"
    assert fedpurel(["node-data", str(out), "--partition-id", "1", "--num-partitions", "4", *overrides(SMALL_RUN)]) == 0
    return out


def test_node_data_refuses_a_bad_run_config_or_partition(tmp_path, capsys):
    out = tmp_path / "never"
    assert (
        fedpurel(["node-data", str(out), "--partition-id", "0", "--num-partitions", "4", "--set", "train.roundz=2"])
        == 2
    )
    assert "unknown key 'train.roundz' (did you mean 'train.rounds'?)" in capsys.readouterr().err
    assert fedpurel(["node-data", str(out), "--partition-id", "4", "--num-partitions", "4"]) == 2
    assert "partition-id (4) must be smaller than num-partitions (4)" in capsys.readouterr().err
    assert not out.exists()


def test_an_exported_partition_reads_back_as_the_same_images(node_dir, small_cfg):
    train, test = load_node_data(str(node_dir), 20)
    reference = client_data(small_cfg.data, small_cfg.seed, node())
    ref_train, ref_test = reference.train, reference.test
    assert train.labels.tolist() == ref_train.labels.tolist() and test.labels.tolist() == ref_test.labels.tolist()
    assert np.array_equal(np.asarray(train.pil(0)), np.asarray(ref_train.pil(0)))


def test_node_data_gives_the_same_features_as_the_partition(node_dir, small_cfg):
    local = client_data(small_cfg.data, small_cfg.seed, node(data_dir=str(node_dir)))
    reference = client_data(small_cfg.data, small_cfg.seed, node())
    assert local.train_identity != reference.train_identity  # its own cache entries: its files, not indices
    local_train, _ = feature_sets(small_cfg, local)
    ref_train, _ = feature_sets(small_cfg, reference)
    assert torch.allclose(local_train.features, ref_train.features, atol=1e-5)
    assert torch.equal(local_train.labels, ref_train.labels)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / "train.txt").unlink(), "has no train.txt"),
        (lambda d: (d / "test.txt").write_text("test/000000.png 99\n"), "outside [0, 19]"),
        (lambda d: (d / "test.txt").write_text("test/nope.png 1\n"), "1 of 1 listed images are missing"),
        (lambda d: (d / "test.txt").write_text("../outside.png 1\n"), "outside the data-dir"),
        (lambda d: (d / "test.txt").write_text("just-a-path\n"), "expected 'relative/path label'"),
        (lambda d: (d / "dataset.json").write_text("{not json"), "not readable JSON"),
        (
            lambda d: (d / "dataset.json").write_text(
                '{"dataset": "mnist-animals", "classnames": ["a", "a"], "template": "{}"}'
            ),
            "distinct names",
        ),
        (
            lambda d: (d / "dataset.json").write_text('{"dataset": "mnist", "classnames": ["a"], "template": "{}"}'),
            "written for dataset 'mnist', but the run uses 'mnist-animals-blur'",
        ),
    ],
)
def test_a_bad_data_dir_is_one_clear_error(node_dir, small_cfg, tmp_path, damage, expected):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(node_dir, copy)
    damage(copy)
    (tmp_path / "outside.png").write_bytes((copy / "test" / "000000.png").read_bytes())  # exists, but not ours
    with pytest.raises(NodeDataError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        client_data(small_cfg.data, small_cfg.seed, node(data_dir=str(copy)))


def test_a_missing_data_dir_is_named(tmp_path):
    with pytest.raises(NodeDataError, match="is not a folder"):
        load_node_data(str(tmp_path / "missing"), 20)


def test_node_config_accepts_data_dir_and_names_it_when_wrong():
    node = parse_node_config({"partition-id": 0, "num-partitions": 2, "data-dir": "/data/site-a"})
    assert node.data_dir == "/data/site-a"
    with pytest.raises(NodeConfigError, match="data-dir"):
        parse_node_config({"partition-id": 0, "num-partitions": 2, "data-dir": 3})


def test_a_node_with_a_data_dir_reads_only_its_folder_and_caches_features_in_its_state_dir(
    node_dir, small_cfg, tmp_path, monkeypatch
):
    classnames, template = classes(small_cfg.data)
    phi_g = build_peft(small_cfg, clip_of(small_cfg.model, small_cfg.data), classnames, template).global_state()
    # The node must not touch the run's Fed-LT split (other clients' data) at all.
    monkeypatch.setattr(data_client, "fedlt_split", lambda *a, **k: pytest.fail("a data-dir node read the split"))
    state_dir = tmp_path / "state"
    me = node(data_dir=str(node_dir), state_dir=str(state_dir))
    _, reply = Client(small_cfg, me, DictMemory(), Instruction(1)).train(phi_g)
    train, _ = load_node_data(str(node_dir), 20)
    assert reply.num_examples == len(train) and reply.partition_id == 1
    cached = list((state_dir / "cache" / "features").glob("*.safetensors"))
    assert len(cached) == 2, "the node's train and test features are cached in its state-dir"


def test_the_exported_folder_names_its_dataset_classes_and_template(node_dir, small_cfg):
    bundle = dataset(small_cfg.data.name, small_cfg.data.root)
    assert read_node_classes(str(node_dir), small_cfg.data.name) == (bundle.classnames, bundle.template)
    assert classes(small_cfg.data, str(node_dir)) == (bundle.classnames, bundle.template)


def make_cifar10(root, per_class_train, per_class_test):
    """A small CIFAR-10 copy in torchvision's on-disk format (5 train batches, test, meta)."""
    import pickle

    def dump(path, obj):
        path.write_bytes(pickle.dumps(obj, protocol=2))

    def rows(offset, n):  # distinct, known images as CIFAR rows [N, 3072]
        i = np.arange(offset, offset + n)[:, None, None]
        r, c = np.arange(32)[None, :, None], np.arange(32)[None, None, :]
        hwc = np.stack([(i + r + 0 * c) % 256, (3 * i + c + 0 * r) % 256, (i * r + c) % 256], -1).astype(np.uint8)
        return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2).reshape(n, 3072))

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    n, nt = 10 * per_class_train, 10 * per_class_test
    images, labels = rows(0, n), np.arange(n) % 10
    for b in range(5):
        part = slice(b * n // 5, (b + 1) * n // 5)
        dump(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": labels[part].tolist(),
                "data": images[part],
                "filenames": [f"img_{i}.png" for i in range(part.start, part.stop)],
            },
        )
    dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": ((np.arange(nt) * 3) % 10).tolist(),
            "data": rows(1000, nt),
            "filenames": [f"t_{i}.png" for i in range(nt)],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump(folder / "batches.meta", {"num_cases_per_batch": n // 5, "label_names": names, "num_vis": 3072})


def test_a_node_of_an_on_disk_dataset_needs_none_of_the_datasets_files(tmp_path, monkeypatch, small_cfg):
    """CIFAR-10-LT with a real checkpoint file: the exported node folder alone is enough for the
    client to train and evaluate; the run's data.root does not exist on the node."""
    import shutil

    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    make_cifar10(tmp_path / "cifar", per_class_train=20, per_class_test=6)
    checkpoint = clip_of(small_cfg.model, small_cfg.data).checkpoint  # the embedded tiny CLIP, as a file
    run = {
        "data.name": "cifar10-lt",
        "data.root": str(tmp_path / "cifar"),
        "model.pretrained": checkpoint,
        "data.n-max": 20,
        "data.imbalance-factor": 10.0,
        "data.min-client-samples": 2,
        "data.client-test-size": 10,
        "train.rounds": 1,
        "train.local-epochs": 1,
    }
    out = tmp_path / "node"
    assert fedpurel(["node-data", str(out), "--partition-id", "0", "--num-partitions", "2", *overrides(run)]) == 0
    shutil.rmtree(tmp_path / "cifar")  # the node holds only its folder
    monkeypatch.setattr(data_client, "load_dataset", lambda *a, **k: pytest.fail("a data-dir node loaded the dataset"))
    data_client.dataset.cache_clear()

    cfg = make_cfg({**run, "data.root": "/nowhere/cifar"})
    me = node(partition_id=0, num_partitions=2, data_dir=str(out))
    classnames, template = classes(cfg.data, str(out))
    assert len(classnames) == 10
    phi_g = build_peft(cfg, clip_of(cfg.model, cfg.data), classnames, template).global_state()
    memory = DictMemory()
    _, reply = Client(cfg, me, memory, Instruction(1)).train(phi_g)
    train, test = load_node_data(str(out), 10)
    assert reply.num_examples == len(train)
    evaluation = Client(cfg, me, memory, Instruction(1)).evaluate(phi_g).evaluation
    assert evaluation.num_examples == len(test)
    assert list(evaluation.class_total) == np.bincount(test.labels, minlength=10).tolist()
    assert all(c <= t for c, t in zip(evaluation.gm_correct, evaluation.class_total, strict=True))
