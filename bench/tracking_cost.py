"""The cost per round of logging a run: the same short in-process run with the trackers off and on.

Each mode is a run of the same config (bench/inprocess.py: the Flower app's computations in this
process) on ``--clients`` clients, every run in its own run folder of one output folder (so the
MLflow runs share one store, ``<output-dir>/mlflow.db``, as a user's runs do); the modes alternate
over ``--repeats`` (off, tensorboard, tensorboard+mlflow when mlflow is installed, off, ...),
after one warm-up run that is not counted (it fills the feature caches and creates the MLflow
store). For every run this prints:

- the loop's seconds per round (the round plan's steps, setup excluded);
- the seconds per round spent inside the trackers (``fedpurel_app.tracking.Tracking``: its
  writers' creation, every step and the finish, timed around the calls), and those three parts;

then, per mode, the median over the repeats and its ratio to the run with logging off.

    python bench/tracking_cost.py                                  # 4 clients, 5 + 2 rounds, 3 repeats
    python bench/tracking_cost.py --repeats 5 --set track.image-every=1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_sets, run_cfg  # noqa: E402
from inprocess import run_inprocess  # noqa: E402

from fedpurel_app import tracking  # noqa: E402

SMALL = {"train.rounds": 5, "personalize.rounds": 2, "train.local-epochs": 1, "data.client-test-size": 20}
MODES = {
    "off": {"track.tensorboard": False, "track.mlflow": False},
    "tensorboard": {"track.tensorboard": True, "track.mlflow": False},
    "tensorboard+mlflow": {"track.tensorboard": True, "track.mlflow": True},
}


PARTS = {"__init__": "create", "step": "steps", "finish": "finish"}


class TrackerClock:
    """Seconds spent in Tracking's constructor, steps and finish (patched around the class)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS.values(), 0.0)
        for name, part in PARTS.items():
            setattr(tracking.Tracking, name, self.timed(getattr(tracking.Tracking, name), part))

    def timed(self, function, part: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return wrapper


def one_run(flat: dict, clients: int, clock: TrackerClock) -> dict:
    """One run (a new run folder in ``flat``'s output-dir): the loop's and the trackers' seconds per round."""
    cfg = run_cfg(flat)
    torch.manual_seed(cfg.seed)
    clock.seconds = dict.fromkeys(PARTS.values(), 0.0)
    out = run_inprocess(cfg, clients)
    steps = len(out["results"]["rounds"]) + 1  # and the zero-shot step
    return {
        "loop_s_per_round": (out["total_s"] - out["setup_s"]) / steps,
        "tracking_s_per_round": sum(clock.seconds.values()) / steps,
        "tracking_s": {part: round(seconds, 4) for part, seconds in clock.seconds.items()},
        "steps": steps,
        "gm_all": out["results"]["final"]["gm"]["all"],
        "run_dir": out["run_dir"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating (default 3)")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (TOML value), repeatable")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as the app's Ray actors)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    flat = {**SMALL, "output-dir": tempfile.mkdtemp(prefix="fedpurel-tracking-cost-"), **parse_sets(args.set)}
    modes = [m for m in MODES if m != "tensorboard+mlflow" or importlib.util.find_spec("mlflow") is not None]
    clock = TrackerClock()
    one_run({**flat, **MODES[modes[-1]]}, args.clients, clock)  # warm-up: feature caches, imports, the store
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode in modes:
            result = one_run({**flat, **MODES[mode]}, args.clients, clock)
            runs[mode].append(result)
            print(json.dumps({"repeat": repeat, "mode": mode, **{k: v for k, v in result.items() if k != "run_dir"}}))
    gm = {round(r["gm_all"], 6) for rs in runs.values() for r in rs}
    print(f"\n{args.clients} clients, {runs['off'][0]['steps']} steps per run, {args.repeats} repeats per mode")
    print(f"runs in {flat['output-dir']}")
    print(f"final GM All of every run: {sorted(gm)} (logging does not change the run)")
    base = statistics.median(r["loop_s_per_round"] for r in runs["off"])
    print(f"{'mode':<20} {'loop s/round':>13} {'ratio to off':>13} {'in trackers s/round':>20}  median s in")
    for mode in modes:
        loop = statistics.median(r["loop_s_per_round"] for r in runs[mode])
        inside = statistics.median(r["tracking_s_per_round"] for r in runs[mode])
        parts = {part: statistics.median(r["tracking_s"][part] for r in runs[mode]) for part in PARTS.values()}
        split = ", ".join(f"{part} {seconds:.3f}" for part, seconds in parts.items())
        print(f"{mode:<20} {loop:>13.3f} {loop / base:>13.3f} {inside:>20.4f}  {split}")


if __name__ == "__main__":
    main()
