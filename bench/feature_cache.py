"""Feature cache: preparing every client's inputs with an empty cache vs with a warm one.

Both passes run in this process on the same config, one after the other; the
ratio is cold / warm. The embedded default by default; any run-config key can
be set, e.g. --set data.name='"mnist"'.

    python bench/feature_cache.py [--clients 20] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import client_inputs, parse_sets, run_cfg  # noqa: E402

from fedpurel_app.data.client import global_test  # noqa: E402
from fedpurel_app.inputs import clip_of, feature_cache_dir, feature_set  # noqa: E402
from fedpurel_app.peft.base import input_kind  # noqa: E402


def prepare_all(cfg, clients: int) -> float:
    """Every client's (train, test) inputs and the server's test set, as a run prepares them."""
    clip = clip_of(cfg.model, cfg.data)
    start = time.perf_counter()
    for k in range(clients):
        client_inputs(cfg, clip, k, clients)
    test = global_test(cfg.data)
    feature_set(
        clip,
        input_kind(cfg.peft.name),
        test.test,
        test.test_identity,
        test.classnames,
        test.template,
        feature_cache_dir(cfg.model),
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (TOML value)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = parse_sets(args.set)
    base = run_cfg(overrides)
    clip = clip_of(base.model, base.data)  # the backbone (and its pretraining) is not what we measure
    with tempfile.TemporaryDirectory() as cache_dir:
        # An empty cache folder holding only the same backbone checkpoint.
        if base.model.pretrained == "embedded":
            shutil.copy(clip.checkpoint, Path(cache_dir) / Path(clip.checkpoint).name)
        cached = run_cfg({**overrides, "model.cache-dir": cache_dir})
        uncached = run_cfg({**overrides, "model.cache-dir": cache_dir, "model.feature-cache": False})
        clip_of(cached.model, cached.data)  # loaded before the timing, as above
        no_cache = prepare_all(uncached, args.clients)
        cold = prepare_all(cached, args.clients)
        warm = prepare_all(cached, args.clients)
    print(
        f"config: data.name={base.data.name} model.name={base.model.name} peft.name={base.peft.name} "
        f"clients={args.clients}"
    )
    print(f"no cache {no_cache:.2f} s | cold cache (compute + write) {cold:.2f} s | warm cache {warm:.2f} s")
    print(f"speed-up of a cached run: {cold / warm:.1f}x over the first run, {no_cache / warm:.1f}x over no cache")


if __name__ == "__main__":
    main()
