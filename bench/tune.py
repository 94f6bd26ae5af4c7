"""The per-variant learning rates of the embedded default, chosen on a validation split, never the test set.

The validation split is held out of the clients' training pools: of the 150
pool images per class of ``mnist-animals-blur``, 40 become the validation set
(GM on it; the clients' PM sets are drawn from it, as from the test set in a
real run) and 110 stay in the pool, so the search runs the default protocol
with ``data.n-max = 110`` (the same imbalance factor, 100). The dataset of the
search is registered by this script (``mnist-animals-blur-validation``): the
test set is never loaded into a run.

Two searches per PEFT variant, one seed, in-process (bench/inprocess.py):

1. the Stage-1 learning rate ``peft.<variant>.lr`` over ``--lrs``, for
   ``promptfl`` and ``fedpurel``: chosen by the mean of the two methods'
   validation GM All (the mean over the last 10 rounds, steadier than the
   last one), so that neither the baseline nor the method alone picks it;
2. then, at that learning rate, the Stage-2 learning rate
   ``peft.<variant>.personal-lr`` over ``--personal-lrs``, for ``fedpurel``:
   chosen by its validation PM All.

    python bench/tune.py [--variants prompt,adapter,lora] [--jobs 2] [--out outputs/tune]

Prints the table of every run and the chosen values; writes them to ``<out>/tune.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

VALIDATION = "mnist-animals-blur-validation"
HELD_OUT = 40  # validation images per class, out of the train pool's 150
SEARCH_N_MAX = 110  # what is left of the pool per class
DEFAULT_LRS = "0.005,0.01,0.02,0.05,0.1"
DEFAULT_PERSONAL_LRS = "0.02,0.05,0.1,0.2"


def register_validation_dataset() -> None:
    """``mnist-animals-blur`` whose test split is HELD_OUT images per class of its train pool."""
    from fedpurel_app.data.base import DatasetBundle
    from fedpurel_app.data.shifted import load_mnist_animals_blur
    from fedpurel_app.registry import DATASETS

    if VALIDATION in DATASETS:
        return

    def load(root: str | None = None, seed: int = 0) -> DatasetBundle:
        base = load_mnist_animals_blur(root, seed)
        labels = base.train.labels
        rng = np.random.default_rng([seed, 7])
        held = np.sort(
            np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:HELD_OUT] for c in range(base.num_classes)])
        )
        pool = np.setdiff1d(np.arange(len(labels)), held)
        return DatasetBundle(
            name=VALIDATION,
            classnames=base.classnames,
            template=base.template,
            train=base.train.subset(pool),
            test=base.train.subset(held),
            backbone=base.backbone,
        )

    DATASETS.register(VALIDATION)(load)


def one_run(job: tuple[str, str, float, float, int, dict]) -> dict:
    """One in-process run of the search (in its own process: registers the validation dataset)."""
    import tempfile

    import torch

    register_validation_dataset()
    from common import run_cfg
    from inprocess import run_inprocess

    variant, method, lr, personal_lr, clients, extra = job
    torch.set_num_threads(1)
    flat = {
        "data.name": VALIDATION,
        "data.n-max": SEARCH_N_MAX,
        "peft.name": variant,
        "method.name": method,
        f"peft.{variant}.lr": lr,
        f"peft.{variant}.personal-lr": personal_lr,
        "output-dir": tempfile.mkdtemp(prefix="fedpurel-tune-"),
        "track.tensorboard": False,
        **extra,
    }
    cfg = run_cfg(flat)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    out = run_inprocess(cfg, clients)
    final = out["results"]["final"]
    return {
        "variant": variant,
        "method": method,
        "lr": lr,
        "personal_lr": personal_lr,
        "gm_all_last10": final.get("gm_last10", {}).get("all"),
        "gm_few_last10": final.get("gm_last10", {}).get("few"),
        "pm_all": final.get("pm", {}).get("all"),
        "zero_shot_gm": out["results"]["zero_shot"]["gm"]["all"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="prompt,adapter,lora")
    parser.add_argument("--lrs", default=DEFAULT_LRS)
    parser.add_argument("--personal-lrs", default=DEFAULT_PERSONAL_LRS)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (processes)")
    parser.add_argument("--out", default="outputs/tune")
    parser.add_argument("--set", action="append", default=[], help="more run-config key=value (e.g. a short smoke run)")
    args = parser.parse_args()
    from common import parse_sets

    extra = parse_sets(args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fedpurel_app.config import default_run_config

    defaults = default_run_config().peft
    variants = [v for v in args.variants.split(",") if v]
    rows: list[dict] = []
    chosen: dict[str, dict[str, float]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        stage1 = [
            (v, m, lr, getattr(defaults, v).personal_lr, args.clients, extra)
            for v in variants
            for lr in floats(args.lrs)
            for m in ("promptfl", "fedpurel")
        ]
        rows += list(pool.map(one_run, stage1))
        for v in variants:
            by_lr: dict[float, list[float]] = {}
            for r in rows:
                if r["variant"] == v:
                    by_lr.setdefault(r["lr"], []).append(r["gm_all_last10"])
            chosen[v] = {"lr": max(by_lr, key=lambda lr: float(np.mean(by_lr[lr])))}
        stage2 = [
            (v, "fedpurel", chosen[v]["lr"], plr, args.clients, extra)
            for v in variants
            for plr in floats(args.personal_lrs)
        ]
        personal = list(pool.map(one_run, stage2))
    rows += [dict(r, search="personal-lr") for r in personal]
    for v in variants:
        candidates = [r for r in personal if r["variant"] == v]
        chosen[v]["personal_lr"] = max(candidates, key=lambda r: r["pm_all"])["personal_lr"]
    print("| variant | method | lr | personal-lr | val GM All (last 10) | val GM Few (last 10) | val PM All | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gm, few, pm = (
            f"{100 * x:.1f}" if x is not None else "–" for x in (r["gm_all_last10"], r["gm_few_last10"], r["pm_all"])
        )
        print(
            f"| {r['variant']} | {r['method']} | {r['lr']:g} | {r['personal_lr']:g} | {gm} | {few} | {pm} | "
            f"{r['seconds']:.0f} |"
        )
    print("chosen:", json.dumps(chosen))
    (out / "tune.json").write_text(json.dumps({"rows": rows, "chosen": chosen}, indent=1) + "\n")


if __name__ == "__main__":
    main()
