"""What the benchmarks share: run configs from dotted keys, the model and a client's inputs.

The library's own functions, composed as a ClientApp message composes them
(``fedpurel_app.client.Client``), for the benchmarks that time one piece of it:

    cfg = run_cfg({"peft.name": "adapter", "train.rounds": 2})
    clip, peft = model(cfg)
    data, train, test = client_inputs(cfg, clip, partition_id=0, num_partitions=20)
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedpurel_app.config import RunConfig, flat_items, parse_node_config, parse_run_config  # noqa: E402


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A nested mapping from dotted keys (what Flower's ``unflatten_dict`` does, without Flower)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings (TOML values, dotted keys) as one flat dict of dotted keys; later ones win."""
    flat: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        flat.update(flat_items(tomllib.loads(f"{key.strip()} = {value.strip()}")))
    return flat


def run_cfg(flat: Mapping[str, Any] | None = None) -> RunConfig:
    """A validated run config from dotted keys (missing keys: the defaults)."""
    return parse_run_config(nested(dict(flat or {})))


def node(partition_id: int, num_partitions: int, **extra: Any):
    return parse_node_config({"partition-id": partition_id, "num-partitions": num_partitions, **extra})


def model(cfg: RunConfig):
    """(the frozen CLIP, a fresh PEFT model of the run) as a client builds them."""
    from fedpurel_app.data.client import classes
    from fedpurel_app.inputs import clip_of
    from fedpurel_app.peft.base import build_peft

    clip = clip_of(cfg.model, cfg.data)
    classnames, template = classes(cfg.data)
    return clip, build_peft(cfg, clip, classnames, template)


def client_inputs(cfg: RunConfig, clip, partition_id: int, num_partitions: int):
    """(ClientData, train FeatureSet, test FeatureSet) of one partition, as a client computes them."""
    from fedpurel_app.data.client import client_data
    from fedpurel_app.inputs import client_feature_sets, feature_cache_dir
    from fedpurel_app.peft.base import input_kind

    data = client_data(cfg.data, cfg.seed, node(partition_id, num_partitions))
    train, test = client_feature_sets(clip, input_kind(cfg.peft.name), data, feature_cache_dir(cfg.model))
    return data, train, test


def method(cfg: RunConfig):
    """The run's method, with the global class counts (for the methods that need the prior)."""
    from fedpurel_app.data.client import class_counts
    from fedpurel_app.methods.base import build_method

    return build_method(cfg, class_counts(cfg.data, cfg.seed))


def stage1_options(cfg: RunConfig, clip):
    """The run's method's Stage-1 options on ``clip``'s device."""
    from fedpurel_app.training import resolve_precision

    return method(cfg).stage1_options(resolve_precision(cfg.model.precision, clip.device))
