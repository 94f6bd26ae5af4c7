"""Framework overhead: a Flower simulation run vs the plain in-process loop, same config.

For each length in ``--rounds`` (default 5 and 30 Stage-1 rounds, then the
default config's 5 personalization rounds: 30 is the default config), this process
runs ``bash scripts/run.sh`` (Flower simulation, Ray, ``NUM_SUPERNODES``
SuperNodes) in a subprocess and ``bench/inprocess.py``'s loop in-process, one
after the other, and prints the wall time of each and their ratio. A linear
fit over the two lengths, t = floor + per_round * rounds, splits each side's
wall time into a fixed start-up floor (Flower: SuperLink, Ray, actors importing
the ClientApp; in-process: loading the model and the cached features) and a
per-round cost. Both sample the same clients (the strategy orders nodes by
the partition they report, as the loop orders partitions) and train them with
the same seeds; the final GM of both is printed, with the largest per-class
difference (FedAvg's float32 sums are not written the same way, so the two
may drift apart by rounding).

    python bench/framework_overhead.py [--rounds 5,30] [--clients 20] [--set key=value ...]

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
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fedpurel_app.config import parse_run_config  # noqa: E402
from inprocess import run_inprocess  # noqa: E402

KEYS = ("all", "many", "medium", "few", "balancedness")


def superlink_running() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 39091)) == 0


def flower_run(overrides: str, clients: int, out: Path) -> tuple[float, dict]:
    env = dict(os.environ, NUM_SUPERNODES=str(clients), OUTPUT_DIR=str(out))
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", "scripts/run.sh", overrides], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"scripts/run.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (results,) = sorted(out.glob("*/results.json"))
    return wall, json.loads(results.read_text())


def fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """(floor, per_round) of the line through the first and last point."""
    per_round = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    return ys[0] - per_round * xs[0], per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="5,30")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--set", action="append", default=[],
                        help="run-config key=value (TOML value) on top of the default config")
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
    base = tomllib.loads("\n".join(f"{kv.split('=', 1)[0]} = {kv.split('=', 1)[1]}" for kv in args.set))
    print(f"config: embedded default, {args.clients} clients (NUM_SUPERNODES={args.clients}), "
          f"overrides {args.set}, Stage-1 rounds {lengths}; nproc {os.cpu_count()}")
    if superlink_running():
        print("note: a local SuperLink was already running and is reused: the Flower floor excludes its start")
    flower_t, loop_t = [], []
    for rounds in lengths:
        run = dict(base, **{"num-rounds": rounds})
        overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in run.items())
        overrides = overrides.replace('"', "'")
        with tempfile.TemporaryDirectory() as out:
            wall_f, results = flower_run(overrides, args.clients, Path(out))
        cfg = parse_run_config(run)
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        loop = run_inprocess(cfg, args.clients)
        wall_l = time.perf_counter() - start
        flower_t.append(wall_f)
        loop_t.append(wall_l)
        gm_f = results["final"]["gm"]
        print(f"{rounds:>3d} rounds: flower {wall_f:6.1f} s | in-process {wall_l:6.1f} s | "
              f"ratio {wall_f / wall_l:.1f}x", flush=True)
        print(f"    final GM  flower    : " + " ".join(f"{k} {gm_f[k]:.3f}" for k in KEYS))
        print(f"    final GM  in-process: " + " ".join(f"{k} {loop['gm'][k]:.3f}" for k in KEYS))
        diff = max(abs(a - b) for a, b in zip(gm_f["per_class"], loop["gm"]["per_class"], strict=True))
        print(f"    PM all    flower {results['final']['pm']['all']:.3f} | in-process {loop['pm']['all']:.3f}; "
              f"largest per-class GM difference {diff:.3f}")
    if len(lengths) >= 2:
        floor_f, per_f = fit(lengths, flower_t)
        floor_l, per_l = fit(lengths, loop_t)
        print(f"fit t = floor + per_round * rounds: flower floor {floor_f:.1f} s + {per_f:.2f} s/round | "
              f"in-process floor {floor_l:.1f} s + {per_l:.2f} s/round")
        for rounds, tf, tl in zip(lengths, flower_t, loop_t):
            gap = tf - tl
            print(f"{rounds:>3d} rounds: gap {gap:.1f} s = floor {floor_f - floor_l:.1f} s "
                  f"({100 * (floor_f - floor_l) / gap:.0f}%) + per-round {(per_f - per_l) * rounds:.1f} s "
                  f"({100 * (per_f - per_l) * rounds / gap:.0f}%)")
        print(f"per-round ratio flower / in-process: {per_f / per_l:.2f}x")


if __name__ == "__main__":
    main()
