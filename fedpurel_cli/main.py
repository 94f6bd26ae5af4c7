"""``fedpurel <command> ...``: the command-line tools, one subcommand each.

fedpurel compare [--methods ...] [--seeds ...] [--out ...] [presets and overrides]
fedpurel report RUNS_FOLDER [--write-to OUT]
fedpurel overrides [presets and key=value strings]     (used by scripts/run.sh)
fedpurel stage DEST                                    (the app's own files, for flwr run)
fedpurel node-data OUT --partition-id I --num-partitions N [--set key=value ...]
fedpurel folder-stats DATA_ROOT {imagenet-lt,places-lt} [IF ...]
fedpurel config [--write | --check]                    (pyproject.toml's [tool.flwr.app.config])
fedpurel prepare [presets and key=value strings]       (the embedded CLIP's first pretraining, with a bar)
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def node_data(argv: Sequence[str]) -> int:
    """Write one partition of a built-in dataset's Fed-LT split as a node data-dir."""
    from flwr.common.config import unflatten_dict

    from fedpurel_app.config import NodeConfig, parse_run_config
    from fedpurel_app.data.client import client_data
    from fedpurel_app.data.local import export_split, write_node_classes
    from fedpurel_app.errors import UserError

    parser = argparse.ArgumentParser(
        prog="fedpurel node-data",
        description="Write one partition of a built-in dataset's Fed-LT split as a node data-dir.",
    )
    parser.add_argument(
        "out", type=Path, help="the node's data-dir to write (train.txt, test.txt, dataset.json, images)"
    )
    parser.add_argument("--partition-id", type=int, required=True)
    parser.add_argument("--num-partitions", type=int, required=True)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override (TOML value), e.g. --set seed=1; repeatable",
    )
    args = parser.parse_args(argv)
    try:
        cfg = parse_run_config(unflatten_dict(tomllib.loads("\n".join(args.set))))
        node = NodeConfig(partition_id=args.partition_id, num_partitions=args.num_partitions)
        data = client_data(cfg.data, cfg.seed, node)
    except (UserError, ValueError, tomllib.TOMLDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_train, n_test = export_split(data.train, args.out, "train"), export_split(data.test, args.out, "test")
    write_node_classes(args.out, cfg.data.name, data.classnames, data.template)
    print(f"wrote {n_train} train and {n_test} test images of partition {args.partition_id} to {args.out}")
    return 0


def folder_stats(argv: Sequence[str]) -> int:
    """Train-pool counts of an LT folder dataset and the largest feasible data.n-max."""
    import numpy as np

    from fedpurel_app.data.folder import FOLDER_DATASETS, load_imagenet_lt, load_places_lt, max_feasible_n_max
    from fedpurel_app.errors import UserError

    parser = argparse.ArgumentParser(prog="fedpurel folder-stats", description=folder_stats.__doc__)
    parser.add_argument("data_root")
    parser.add_argument("dataset", choices=sorted(FOLDER_DATASETS))
    parser.add_argument("imbalance_factor", nargs="*", type=float, default=[100.0, 256.0])
    args = parser.parse_args(argv)
    loader = {"imagenet-lt": load_imagenet_lt, "places-lt": load_places_lt}[args.dataset]
    try:
        bundle = loader(args.data_root)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = np.bincount(bundle.train.labels, minlength=bundle.num_classes)
    print(
        f"{args.dataset}: {len(bundle.train)} train images, {len(bundle.test)} test images, "
        f"{bundle.num_classes} classes; train count per class max {counts.max()}, min {counts.min()}; "
        f"pool Many(>100) {int((counts > 100).sum())}, Few(<20) {int((counts < 20).sum())}"
    )
    for factor in args.imbalance_factor:
        print(
            f"imbalance-factor {factor:g}: largest feasible data.n-max = "
            f"{max_feasible_n_max(bundle.train.labels, bundle.num_classes, factor)}"
        )
    return 0


def config(argv: Sequence[str], pyproject: Path = ROOT / "pyproject.toml") -> int:
    """Print pyproject.toml's [tool.flwr.app.config] as the config models define it; --write puts
    it in place, --check exits 1 when the file differs."""
    from fedpurel_app.config import pyproject_section

    parser = argparse.ArgumentParser(prog="fedpurel config", description=config.__doc__)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    wanted = pyproject_section()
    text = pyproject.read_text()
    current = config_section(text)
    if args.check:
        if current != wanted:
            print(
                f"{pyproject}: [tool.flwr.app.config] differs from the config models: run `fedpurel config --write`",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.write:
        pyproject.write_text(text.replace(current, wanted) if current else text.rstrip() + "\n\n" + wanted)
        return 0
    print(wanted, end="")
    return 0


def config_section(text: str) -> str:
    """The ``[tool.flwr.app.config]`` section of a pyproject.toml text, up to the next table."""
    start = text.find("[tool.flwr.app.config]\n")
    if start < 0:
        return ""
    end = text.find("\n[", start + 1)
    section = text[start : end + 1 if end >= 0 else len(text)]
    return section.rstrip("\n") + "\n"


def prepare(argv: Sequence[str]) -> int:
    """Pretrain the embedded CLIP of a run config, if it is not in the cache yet, in this terminal
    (with a progress bar), so that the run itself starts at once. Nothing to do for other models.
    When a checkpoint of this model and dataset is cached, this returns without importing torch."""
    from fedpurel_app.config import default_cache_dir, flat_items

    from .overrides import OverrideError, merge

    try:
        pairs = merge(list(argv))
    except OverrideError as err:
        print(f"fedpurel: {err}", file=sys.stderr)
        return 2
    defaults = dict(flat_items(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]))
    values = {**defaults, **pairs}
    if values["model.pretrained"] != "embedded":
        return 0
    cache = values["model.cache-dir"]
    folder = Path(cache).expanduser() if cache else default_cache_dir()
    if any(folder.glob(f"{values['model.name']}__{values['data.name']}__seed*.safetensors")):
        return 0  # pretrained before (the run checks the exact file, and pretrains itself if need be)
    from fedpurel_app.data.client import BACKBONE_SEED, backbone_data
    from fedpurel_app.errors import ConfigError, UserError

    try:  # the data layer needs no torch: a shifted dataset's CLIP is its backbone's, cached or not
        bundle = backbone_data(str(values["data.name"]), str(values["data.root"]))
    except UserError:
        return 0  # a bad dataset is the run's to report, once
    if any(folder.glob(f"{values['model.name']}__{bundle.name}__seed*.safetensors")):
        return 0
    import logging

    from flwr.common.config import unflatten_dict

    from fedpurel_app.config import parse_run_config
    from fedpurel_app.models.pretrain import ensure_embedded_checkpoint

    logging.basicConfig(level=logging.WARNING, format="fedpurel: %(message)s")
    logging.getLogger("fedpurel_app").setLevel(logging.INFO)
    try:
        cfg = parse_run_config(unflatten_dict(pairs))
    except ConfigError:
        return 0  # a bad config is the run's to report: once, and Flower records the run as failed
    try:
        ensure_embedded_checkpoint(cfg.model.name, bundle, cache_dir=cfg.model.cache_dir or None, seed=BACKBONE_SEED)
    except UserError as err:
        print(f"fedpurel: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "compare": lambda rest: _compare(rest),
        "report": lambda rest: _report(rest),
        "overrides": lambda rest: _overrides(rest),
        "stage": lambda rest: _stage(rest),
        "node-data": node_data,
        "folder-stats": folder_stats,
        "config": config,
        "prepare": prepare,
    }
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return int(commands[argv[0]](argv[1:]) or 0)


def _compare(rest: list[str]) -> int:
    from .compare import main as compare_main

    return compare_main(rest)


def _report(rest: list[str]) -> int:
    from .reporting import main as report_main

    return report_main(rest)


def _overrides(rest: list[str]) -> int:
    from .overrides import main as overrides_main

    return overrides_main(rest)


def _stage(rest: list[str]) -> int:
    from .stage import main as stage_main

    return stage_main(rest)


if __name__ == "__main__":
    sys.exit(main())
