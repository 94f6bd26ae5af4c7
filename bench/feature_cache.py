"""Feature cache: preparing every client's inputs with an empty cache vs with a warm one.

Both passes run in this process on the same config, one after the other; the
ratio is cold / warm. The embedded default by default; any run-config key can
be set, e.g. --set dataset='"mnist"'.

    python bench/feature_cache.py [--clients 20] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedpurel_app import task  # noqa: E402
from fedpurel_app.config import parse_run_config  # noqa: E402


def prepare_all(cfg, clients: int) -> float:
    start = time.perf_counter()
    for k in range(clients):
        task.client_feature_sets(cfg, k, clients)
    task.global_test_set(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (TOML value)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = tomllib.loads("\n".join(f"{kv.split('=', 1)[0]} = {kv.split('=', 1)[1]}" for kv in args.set))
    base = parse_run_config(overrides)
    clip = task.load_clip(base)  # the backbone (and its pretraining) is not what we measure
    with tempfile.TemporaryDirectory() as cache_dir:
        # An empty cache folder holding only the same backbone checkpoint.
        if base.pretrained == "embedded":
            shutil.copy(clip.checkpoint, Path(cache_dir) / Path(clip.checkpoint).name)
        cached = base.model_copy(update={"cache_dir": cache_dir})
        uncached = cached.model_copy(update={"feature_cache": False})
        task.load_clip(cached)
        no_cache = prepare_all(uncached, args.clients)
        cold = prepare_all(cached, args.clients)
        warm = prepare_all(cached, args.clients)
    print(f"config: dataset={base.dataset} model={base.model} clients={args.clients}")
    print(f"no cache {no_cache:.2f} s | cold cache (compute + write) {cold:.2f} s | warm cache {warm:.2f} s")
    print(f"speed-up of a cached run: {cold / warm:.1f}x over the first run, {no_cache / warm:.1f}x over no cache")


if __name__ == "__main__":
    main()
