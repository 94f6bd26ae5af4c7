"""A SuperNode's own data folder (node-config data-dir) and its feature cache in the state-dir."""

import os

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from client_app import app as client
from fedpurel_app import task
from fedpurel_app.config import ConfigError, parse_node_config
from fedpurel_app.data.local import NodeDataError, _main, load_node_data, read_node_classes
from tests.conftest import SMALL_RUN
from tests.test_apps import make_context, server_message, task_identity  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory, small_cfg):
    out = tmp_path_factory.mktemp("node") / "data"
    overrides = [arg for k, v in SMALL_RUN.items() for arg in ("--set", f"{k}={v}")]
    assert _main([str(out), "--partition-id", "1", "--num-partitions", "4", *overrides]) == 0
    return out


def test_an_exported_partition_reads_back_as_the_same_images(node_dir, small_cfg):
    train, test = load_node_data(str(node_dir), 20)
    ref_train, ref_test = task.client_splits(small_cfg, 1, 4)
    assert train.labels.tolist() == ref_train.labels.tolist() and test.labels.tolist() == ref_test.labels.tolist()
    assert np.array_equal(np.asarray(train.pil(0)), np.asarray(ref_train.pil(0)))


def test_node_data_gives_the_same_features_as_the_partition(node_dir, small_cfg):
    local_train, _ = task.client_feature_sets(small_cfg, 1, 4, data_dir=str(node_dir))
    ref_train, _ = task.client_feature_sets(small_cfg, 1, 4)
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
        (lambda d: (d / "dataset.json").write_text('{"dataset": "mnist-animals", "classnames": ["a", "a"], '
                                                   '"template": "{}"}'), "distinct names"),
        (lambda d: (d / "dataset.json").write_text('{"dataset": "mnist", "classnames": ["a"], "template": "{}"}'),
         "written for dataset 'mnist', but the run uses 'mnist-animals'"),
    ],
)
def test_a_bad_data_dir_is_one_clear_error(node_dir, small_cfg, tmp_path, damage, expected):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(node_dir, copy)
    damage(copy)
    (tmp_path / "outside.png").write_bytes((copy / "test" / "000000.png").read_bytes())  # exists, but not ours
    with pytest.raises(NodeDataError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        task.client_splits(small_cfg, 1, 4, data_dir=str(copy))


def test_a_missing_data_dir_is_named(tmp_path):
    with pytest.raises(NodeDataError, match="is not a folder"):
        load_node_data(str(tmp_path / "missing"), 20)


def test_node_config_accepts_data_dir_and_names_it_when_wrong():
    node = parse_node_config({"partition-id": 0, "num-partitions": 2, "data-dir": "/data/site-a"})
    assert node.data_dir == "/data/site-a"
    with pytest.raises(ConfigError, match="data-dir"):
        parse_node_config({"partition-id": 0, "num-partitions": 2, "data-dir": 3})


def test_a_node_with_a_data_dir_reads_only_its_folder_and_caches_features_in_its_state_dir(
    node_dir, small_cfg, tmp_path, monkeypatch
):
    # The node must not touch the run's Fed-LT split (other clients' data) at all.
    monkeypatch.setattr(task, "fedlt_split", lambda *a, **k: pytest.fail("a data-dir node read the global split"))
    phi_g = task.build_model(small_cfg).global_state()
    context = make_context(partition_id=1)
    state_dir = tmp_path / "state"
    context.node_config = {**context.node_config, "data-dir": str(node_dir), "state-dir": str(state_dir)}
    reply = client.train(server_message(phi_g, MessageType.TRAIN), context)
    train, _ = load_node_data(str(node_dir), 20)
    assert reply.content["metrics"]["num-examples"] == len(train)
    cached = list((state_dir / "cache" / "features").glob("*.safetensors"))
    assert len(cached) == 2, "the node's train and test features are cached in its state-dir"


def test_the_exported_folder_names_its_dataset_classes_and_template(node_dir, small_cfg):
    bundle = task.dataset(small_cfg.dataset, small_cfg.data_root)
    assert read_node_classes(str(node_dir), small_cfg.dataset) == (bundle.classnames, bundle.template)
    assert task.classes(small_cfg, str(node_dir)) == (bundle.classnames, bundle.template)


def test_a_node_of_an_on_disk_dataset_needs_none_of_the_datasets_files(tmp_path, monkeypatch, small_cfg):
    """CIFAR-10-LT with a real checkpoint file: the exported node folder alone is enough for the
    ClientApp to train and evaluate; the run's data-root does not exist on the node."""
    import shutil
    import torchvision.datasets.cifar as tv_cifar

    from tests.test_cifar import make_cifar10

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    make_cifar10(tmp_path / "cifar", per_class_train=20, per_class_test=6)
    checkpoint = task.load_clip(small_cfg).checkpoint  # the embedded tiny CLIP, as a checkpoint file
    run = {"dataset": "cifar10-lt", "data-root": str(tmp_path / "cifar"), "pretrained": checkpoint,
           "n-max": 20, "imbalance-factor": 10.0, "min-client-samples": 2, "client-test-size": 10,
           "num-rounds": 1, "local-epochs": 1}
    overrides = [arg for k, v in run.items() for arg in ("--set", f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")]
    out = tmp_path / "node"
    assert _main([str(out), "--partition-id", "0", "--num-partitions", "2", *overrides]) == 0
    shutil.rmtree(tmp_path / "cifar")  # the node holds only its folder
    monkeypatch.setattr(task, "load_dataset", lambda *a, **k: pytest.fail("a data-dir node loaded the dataset"))
    task.dataset.cache_clear()

    context = make_context(partition_id=0, num_partitions=2)
    context.run_config = {**run, "data-root": "/nowhere/cifar"}
    context.node_config = {**context.node_config, "data-dir": str(out)}
    from fedpurel_app.config import parse_run_config

    phi_g = task.build_model(parse_run_config(context.run_config), str(out)).global_state()
    reply = client.train(server_message(phi_g, MessageType.TRAIN), context)
    assert not reply.has_error()
    train, test = load_node_data(str(out), 10)
    assert reply.content["metrics"]["num-examples"] == len(train)
    evaluation = client.evaluate(server_message(phi_g, MessageType.EVALUATE), context).content["metrics"]
    assert evaluation["num-examples"] == len(test) and evaluation["labels"] == test.labels.tolist()
