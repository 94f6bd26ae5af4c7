"""The on-disk feature cache: reused, rebuilt when its key changes, safe under concurrency."""

import threading
import time
from dataclasses import replace

import pytest
import torch

from fedpurel_app.config import NodeConfig
from fedpurel_app.data.client import client_data, dataset
from fedpurel_app.inputs import client_feature_sets, clip_of, feature_cache_dir
from fedpurel_app.models import feature_cache
from fedpurel_app.models.feature_cache import cached_image_features, feature_key
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def clip(small_cfg):
    return clip_of(small_cfg.model, small_cfg.data)


@pytest.fixture(scope="module")
def split(small_cfg):
    return dataset(small_cfg.data.name, small_cfg.data.root).test.subset(range(40))


@pytest.fixture
def counted(monkeypatch):
    """Count (and slow down) real encoder passes."""
    calls = []
    real = feature_cache.encode_images

    def encode(clip, split):
        calls.append(len(split))
        time.sleep(0.2)
        return real(clip, split)

    monkeypatch.setattr(feature_cache, "encode_images", encode)
    return calls


def test_second_call_reads_the_cache(clip, split, counted, tmp_path):
    first = cached_image_features(clip, split, "mnist/test/a", tmp_path)
    second = cached_image_features(clip, split, "mnist/test/a", tmp_path)
    assert counted == [40]
    assert torch.equal(first, second)


def test_any_change_of_the_key_rebuilds(clip, split, counted, tmp_path):
    cached_image_features(clip, split, "mnist/test/a", tmp_path)
    cached_image_features(clip, split, "mnist/test/b", tmp_path)  # other samples
    other_preprocess = replace(clip, preprocess=lambda image: clip.preprocess(image))
    assert feature_key(other_preprocess, "x") != feature_key(clip, "x")
    renamed = replace(clip, name="other-model")
    cached_image_features(renamed, split, "mnist/test/a", tmp_path)
    assert counted == [40, 40, 40]
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 3


def test_a_changed_checkpoint_file_changes_the_key(clip, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"one")
    a = feature_key(replace(clip, checkpoint=str(checkpoint)), "s")
    checkpoint.write_bytes(b"three")
    assert feature_key(replace(clip, checkpoint=str(checkpoint)), "s") != a


def test_concurrent_builders_compute_once(clip, split, counted, tmp_path):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_image_features(clip, split, "s", tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counted == [40]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_a_stale_entry_is_reported(clip, split, tmp_path):
    cached_image_features(clip, split, "s", tmp_path)
    with pytest.raises(ValueError, match="delete the file"):
        cached_image_features(clip, split.subset(range(10)), "s", tmp_path)


def test_the_pipeline_uses_the_cache_unless_switched_off(clip, tmp_path, counted):
    """client_feature_sets goes through the on-disk cache in feature_cache_dir(model): the run's
    cache-dir, a node's state-dir, or nowhere with model.feature-cache = false."""
    on = make_cfg({"model.cache-dir": str(tmp_path)})
    assert feature_cache_dir(on.model) == str(tmp_path)
    assert feature_cache_dir(on.model, str(tmp_path / "state")) == str(tmp_path / "state" / "cache")
    data = client_data(on.data, on.seed, NodeConfig(partition_id=0, num_partitions=5))
    # The embedded clip of the run (not re-pretrained into tmp_path): only the cache folder is new.
    first = client_feature_sets(clip, "features", data, feature_cache_dir(on.model))
    second = client_feature_sets(clip, "features", data, feature_cache_dir(on.model))
    assert len(counted) == 2, "train and test encoded once, then read from disk"
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2
    assert all(torch.equal(a.features, b.features) for a, b in zip(first, second, strict=True))
    off = make_cfg({"model.cache-dir": str(tmp_path), "model.feature-cache": False})
    assert feature_cache_dir(off.model) is None and feature_cache_dir(off.model, str(tmp_path / "state")) is None
    uncached = client_feature_sets(clip, "features", data, feature_cache_dir(off.model))
    assert len(counted) == 2, "with the cache off, the pipeline does not go through it"
    assert all(torch.allclose(a.features, b.features, atol=1e-6) for a, b in zip(first, uncached, strict=True))
