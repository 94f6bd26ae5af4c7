"""On-disk cache of frozen image features, for variants whose image encoder is frozen.

A cache entry is keyed by everything that determines the features: the model
name, the checkpoint's identity (tag, or file path with size and mtime), the
dataset and the samples of the split (an identity string given by the caller,
e.g. ``"mnist/train/<digest of the indices>"``), and the preprocessing. When
any of them changes, the key changes and the features are recomputed. Entries
are written atomically under a lock, so two clients on one host that need the
same features compute them once and never read a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..storage import file_lock, save_tensors_atomic
from .features import encode_images


def checkpoint_identity(checkpoint: str) -> str:
    """A tag as is; a file as path, size and modification time (cheap, changes when the file does)."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return checkpoint


def feature_key(clip: Any, split_identity: str) -> str:
    payload = {
        "model": clip.name,
        "checkpoint": checkpoint_identity(str(clip.checkpoint)),
        "split": split_identity,
        "preprocess": repr(clip.preprocess),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cached_image_features(clip: Any, split: Any, split_identity: str, cache_dir: str | os.PathLike) -> torch.Tensor:
    """The frozen image features [N, D] of ``split``, from the cache or computed and stored.

    Returns float32 features on the CPU, like :func:`encode_images`.
    """
    from safetensors.torch import load_file

    folder = Path(cache_dir).expanduser() / "features"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{feature_key(clip, split_identity)}.safetensors"
    if not path.is_file():
        with file_lock(path.with_name(path.name + ".lock")):
            if not path.is_file():  # another process may have written it while we waited
                features = encode_images(clip, split)
                save_tensors_atomic({"features": features}, path, {"split": split_identity})
                return features
    features = load_file(str(path))["features"]
    if features.shape[0] != len(split):
        raise ValueError(
            f"feature cache entry {path} has {features.shape[0]} rows for a split of {len(split)}: "
            "delete the file to rebuild it"
        )
    return features
