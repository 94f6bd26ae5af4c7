"""Framework overhead: a Flower simulation run vs the plain in-process loop, same config.

For each length in ``--rounds`` (default 5 and 30 Stage-1 rounds, then the
default config's 5 personalization rounds: 30 is the default config), this process
times, one after the other:

- ``bash scripts/run.sh`` (Flower simulation, Ray, ``NUM_SUPERNODES`` SuperNodes),
  a subprocess, from the command to its exit;
- ``python bench/inprocess.py`` (the plain loop), a subprocess timed the same way:
  what a plain script doing the same computations costs, Python start-up and
  imports included (the ratio the target is about);
- the same loop in this process (warm: torch and the app already imported).

A linear fit over the two lengths, t = floor + per_round * rounds, splits each
side's wall time into a fixed start-up floor (Flower: SuperLink, Ray, actors
importing the ClientApp; the loop: loading the model and the cached features)
and a per-round cost. All sample the same clients (the strategy orders nodes by
the partition they report, as the loop orders partitions) and train them with
the same seeds and sum FedAvg in the same order; the final GM of each is
printed, with the largest per-class difference (0: the loop computes exactly
what the app computes).

With ``--repeats N`` each Flower run and fresh-process loop runs N times,
interleaved, and the medians are used (the Flower runs' start-up moves by a
few seconds from run to run). Each Flower run's time outside its ServerApp's
rounds (start-up before the first round, and the end after the last) is
printed too: the ServerApp records when every round ended.

    python bench/framework_overhead.py [--rounds 5,30] [--repeats 1] [--clients 20] [--set key=value ...]

Runs on the local SuperLink of ``scripts/run.sh`` (127.0.0.1:39091). If one is
already running (someone else's run), Flower would reuse it, the floor would not
include its start, and each run.sh would stop the other's SuperLink: the script
waits up to ``--wait`` seconds for the port to be free, then refuses
(``--shared`` runs anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import parse_sets, run_cfg  # noqa: E402
from inprocess import run_inprocess  # noqa: E402

KEYS = ("all", "many", "medium", "few", "balancedness")


def superlink_running() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 39091)) == 0


def flower_run(overrides: str, clients: int, out: Path) -> tuple[float, dict]:
    env = dict(os.environ, NUM_SUPERNODES=str(clients), OUTPUT_DIR=str(out))
    start = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/run.sh", overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"scripts/run.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (results,) = sorted(out.glob("*/results.json"))
    return wall, json.loads(results.read_text())


def loop_run(run: dict, clients: int) -> tuple[float, dict]:
    """Wall time and summary of ``bench/inprocess.py`` in a fresh process, one thread."""
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "inprocess.py"),
        "--threads",
        "1",
        "--clients",
        str(clients),
        "--per-class",
    ]
    for key, value in run.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench/inprocess.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def toml_value(value) -> str:
    """A run-config value as scripts/run.sh's TOML overrides take it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    return str(value)


def fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """(floor, per_round) of the line through the first and last point."""
    per_round = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    return ys[0] - per_round * xs[0], per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="5,30")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per length (medians)")
    parser.add_argument(
        "--set", action="append", default=[], help="run-config key=value (TOML value) on top of the default config"
    )
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a free SuperLink port")
    parser.add_argument("--shared", action="store_true", help="run even if a local SuperLink is running")
    args = parser.parse_args()
    deadline = time.time() + args.wait
    while superlink_running() and not args.shared:
        if time.time() > deadline:
            raise SystemExit("a local SuperLink is running on 127.0.0.1:39091 (another run): not measuring")
        time.sleep(5)
    torch.set_num_threads(1)  # as a Ray actor with client-resources-num-cpus=1 runs torch
    lengths = [int(r) for r in args.rounds.split(",")]
    base = parse_sets(args.set)
    print(
        f"config: embedded default, {args.clients} clients (NUM_SUPERNODES={args.clients}), "
        f"overrides {args.set}, Stage-1 rounds {lengths}; nproc {os.cpu_count()}"
    )
    if superlink_running():
        print("note: a local SuperLink was already running and is reused: the Flower floor excludes its start")
    flower_t, fresh_t, loop_t = [], [], []
    for rounds in lengths:
        run = {**base, "train.rounds": rounds}
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run.items())
        walls_f, walls_p, outside = [], [], []
        for _ in range(max(1, args.repeats)):
            with tempfile.TemporaryDirectory() as out:
                wall, results = flower_run(overrides, args.clients, Path(out))
            walls_f.append(wall)
            outside.append(wall - max(r["wall_time"] for r in results["rounds"]))
            wall, fresh = loop_run(run, args.clients)
            walls_p.append(wall)
        wall_f, wall_p = statistics.median(walls_f), statistics.median(walls_p)
        with tempfile.TemporaryDirectory() as out:
            cfg = run_cfg({**run, "output-dir": out})
            torch.manual_seed(cfg.seed)
            start = time.perf_counter()
            loop = run_inprocess(cfg, args.clients)["results"]["final"]
            wall_l = time.perf_counter() - start
        flower_t.append(wall_f)
        fresh_t.append(wall_p)
        loop_t.append(wall_l)
        gm_f = results["final"]["gm"]
        print(
            f"{rounds:>3d} rounds: flower {wall_f:6.1f} s | plain loop, fresh process {wall_p:6.1f} s "
            f"(ratio {wall_f / wall_p:.2f}x, overhead {100 * (wall_f / wall_p - 1):.0f}%) | plain loop, warm "
            f"{wall_l:6.1f} s (ratio {wall_f / wall_l:.2f}x)",
            flush=True,
        )
        if len(walls_f) > 1:
            print(
                f"    runs: flower {' '.join(f'{w:.1f}' for w in walls_f)} s | plain loop, fresh process "
                f"{' '.join(f'{w:.1f}' for w in walls_p)} s"
            )
        print(
            f"    flower outside the ServerApp's rounds (start-up and end): {' '.join(f'{w:.1f}' for w in outside)} s"
        )
        print("    final GM  flower    : " + " ".join(f"{k} {gm_f[k]:.3f}" for k in KEYS))
        print("    final GM  plain loop: " + " ".join(f"{k} {loop['gm'][k]:.3f}" for k in KEYS))
        diff = max(
            abs(a - b)
            for other in (loop["gm"]["per_class"], fresh["gm_per_class"])
            for a, b in zip(gm_f["per_class"], other, strict=True)
        )
        print(
            f"    PM all    flower {results['final']['pm']['all']:.3f} | plain loop {loop['pm']['all']:.3f} "
            f"(fresh process {fresh['pm_all']:.3f}); largest per-class GM difference {diff:.3f}"
        )
    if len(lengths) >= 2:
        floor_f, per_f = fit(lengths, flower_t)
        floor_p, per_p = fit(lengths, fresh_t)
        floor_l, per_l = fit(lengths, loop_t)
        print(
            f"fit t = floor + per_round * rounds: flower floor {floor_f:.1f} s + {per_f:.2f} s/round | "
            f"plain loop, fresh process: floor {floor_p:.1f} s + {per_p:.2f} s/round | "
            f"warm: floor {floor_l:.1f} s + {per_l:.2f} s/round"
        )
        for rounds, tf, tp in zip(lengths, flower_t, fresh_t, strict=True):
            gap = tf - tp
            print(
                f"{rounds:>3d} rounds: gap to the fresh-process loop {gap:.1f} s = floor {floor_f - floor_p:.1f} s "
                f"({100 * (floor_f - floor_p) / gap:.0f}%) + per-round {(per_f - per_p) * rounds:.1f} s "
                f"({100 * (per_f - per_p) * rounds / gap:.0f}%)"
            )
        print(f"per-round ratio flower / plain loop: {per_f / per_p:.2f}x (fresh process), {per_f / per_l:.2f}x (warm)")


if __name__ == "__main__":
    main()
