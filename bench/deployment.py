"""Deployment vs simulation: one config on a loopback deployment and in simulation, side by side.

1. **ClientApp message start.** In deployment every message runs in a fresh
   ClientApp process: it imports the app (torch, flwr, open_clip), builds
   the model and, to train, creates its first optimizer (which imports
   ``torch._dynamo``) before any work. Measured ``--starts`` times in fresh
   processes; ``--starts-only`` stops there.
2. **Run and round times.** ``deploy/start.sh`` starts a SuperLink and
   ``--nodes`` SuperNodes on loopback (TLS and node authentication on, random
   free ports, a temporary deploy folder), ``deploy/run.sh`` runs the config,
   ``deploy/stop.sh`` stops every process it started (also on failure). Then
   ``scripts/run.sh`` runs the same config in simulation with as many
   SuperNodes. Wall times, and the time of every round from each run's
   ``results.json`` (the ServerApp's elapsed time when it recorded the round).

    python bench/deployment.py [--nodes 3] [--starts 3] [--starts-only] [--set key=value ...]

Runs the simulation on the local SuperLink of ``scripts/run.sh``
(127.0.0.1:39091): do not run it beside another simulation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from framework_overhead import flower_run  # noqa: E402

from deploy.loopback import loopback_env, message_start_cost  # noqa: E402

DEFAULT = [
    "train.rounds=3",
    "personalize.rounds=2",
    "train.local-epochs=1",
    "personalize.epochs=1",
    "data.client-test-size=30",
]


def message_start(repeats: int) -> list[tuple[float, float, float, float]]:
    """(imports, model build, first optimizer, wall) of ``repeats`` fresh processes doing what a
    ClientApp message does first."""
    try:
        return [message_start_cost() for _ in range(repeats)]
    except RuntimeError as err:
        raise SystemExit(str(err)) from None


def round_times(results: dict) -> dict[int, tuple[str, float]]:
    """{round: (phase, seconds it took)} from a results.json; round 1 is left out (its time
    includes the zero-shot evaluation before it)."""
    rounds = [(r["round"], r["phase"], r["wall_time"]) for r in results["rounds"] if r["phase"] != "final"]
    return {rnd: (phase, end - prev) for (_, _, prev), (rnd, phase, end) in zip(rounds, rounds[1:], strict=False)}


def deployment_run(overrides: str, nodes: int, work: Path) -> tuple[float, dict]:
    """Wall time of deploy/run.sh on a fresh loopback federation, and its results.json."""
    env = {**loopback_env(work, nodes), "OUTPUT_DIR": str(work / "outputs")}

    def script(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(ROOT / "deploy" / name), *args], cwd=ROOT, env=env, capture_output=True, text=True
        )

    try:
        started = script("start.sh")
        if started.returncode != 0:
            raise SystemExit(f"deploy/start.sh failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
        start = time.perf_counter()
        run = script("run.sh", overrides)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(f"deploy/run.sh failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        (results,) = sorted((work / "outputs").glob("*/results.json"))
        return wall, json.loads(results.read_text())
    finally:
        script("stop.sh")


def median_time(times: dict[int, tuple[str, float]], phase: str) -> float | None:
    values = [t for p, t in times.values() if p == phase]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--starts", type=int, default=3, help="fresh ClientApp processes to time")
    parser.add_argument("--starts-only", action="store_true", help="time the message start only")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (added to the default)")
    args = parser.parse_args()
    overrides = " ".join(DEFAULT + args.set + [f"train.min-nodes={args.nodes}"])
    print(f"config: embedded default with {overrides}; {args.nodes} SuperNodes; nproc {os.cpu_count()}")

    starts = message_start(args.starts)
    imports, build, optimizer, wall = (statistics.median(column) for column in zip(*starts, strict=True))
    print(
        f"ClientApp message start (fresh process, median of {args.starts}): imports {imports:.1f} s, "
        f"model build {build:.1f} s, first optimizer {optimizer:.1f} s, wall {wall:.1f} s"
    )
    if args.starts_only:
        return

    with tempfile.TemporaryDirectory() as tmp:
        deploy_wall, deploy_results = deployment_run(overrides, args.nodes, Path(tmp) / "deploy")
        sim_wall, sim_results = flower_run(overrides, args.nodes, Path(tmp) / "sim")
    print(
        f"run wall time: deployment {deploy_wall:.1f} s | simulation {sim_wall:.1f} s | "
        f"ratio {deploy_wall / sim_wall:.2f}x"
    )
    deploy_rounds, sim_rounds = round_times(deploy_results), round_times(sim_results)
    for phase in ("global", "personal"):
        d, s = median_time(deploy_rounds, phase), median_time(sim_rounds, phase)
        if d is not None and s is not None:
            print(
                f"{phase} round (median, round 1 excluded): deployment {d:.1f} s | simulation {s:.1f} s | "
                f"ratio {d / s:.1f}x"
            )
    for name, results in (("deployment", deploy_results), ("simulation", sim_results)):
        gm, pm = results["final"].get("gm", {}), results["final"].get("pm", {})
        print(f"final {name}: GM all {gm.get('all', float('nan')):.3f} | PM all {pm.get('all', float('nan')):.3f}")


if __name__ == "__main__":
    main()
