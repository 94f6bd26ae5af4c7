"""The on-disk feature cache: reused, rebuilt when its key changes, safe under concurrency."""

import threading
import time
from dataclasses import replace

import pytest
import torch

from fedpurel_app import task
from fedpurel_app.models import feature_cache
from fedpurel_app.models.feature_cache import cached_image_features, feature_key


@pytest.fixture(scope="module")
def clip(small_cfg):
    return task.load_clip(small_cfg)


@pytest.fixture(scope="module")
def split(small_cfg):
    return task.dataset(small_cfg.dataset, small_cfg.data_root).test.subset(range(40))


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


def test_task_uses_the_cache_unless_switched_off(clip, tmp_path, counted, monkeypatch):
    from fedpurel_app.config import parse_run_config

    monkeypatch.setattr(task, "load_clip", lambda cfg: clip)  # the embedded model, not re-pretrained in tmp_path
    on = parse_run_config({"cache-dir": str(tmp_path)})
    task.client_feature_sets(on, 0, 5)
    task.client_feature_sets(on, 0, 5)
    assert len(counted) == 2, "train and test encoded once, then read from disk"
    off = parse_run_config({"cache-dir": str(tmp_path), "feature-cache": False})
    task.client_feature_sets(off, 0, 5)
    assert len(counted) == 2, "with the cache off, task does not go through it"
