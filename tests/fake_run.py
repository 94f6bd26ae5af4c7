"""A stand-in for scripts/run.sh in the tests of fedpurel_cli.compare: writes a results.json, trains nothing.

Takes run.sh's arguments (the last one is the runner's "method.name='<m>' seed=<k>") and
writes ``$OUTPUT_DIR/<n>-fake-<m>-seed<k>/results.json`` with accuracies that
depend on the method and seed. Environment:

- ``FAKE_RUN_LOG``: a file that gets one JSON line per call (the arguments);
- ``FAKE_RUN_FAIL``: ``<method>:<seed>`` makes that job write an unfinished results.json and exit 1;
- ``FAKE_RUN_BARRIER``: ``<folder>:<n>``: every job waits until n jobs are running at once (exit 3 if
  they never are).
"""

import json
import os
import re
import sys
from pathlib import Path

COUNTS = [100, 40, 12, 3]  # class_counts of the fake long tail
REPORTS = {"pft": ["pm"], "lp-ft": ["gm"]}  # the other methods report both


def fake_results(method: str, seed: int, args: list[str], variant: str = "prompt") -> dict:
    """A complete results.json of ``method`` and ``seed`` (accuracies grow with both)."""
    base = 0.5 + 0.01 * len(method) + 0.01 * seed
    gm = {
        "all": base,
        "many": base + 0.1,
        "medium": base,
        "few": base - 0.1,
        "balancedness": base - 0.2,
        "per_class": [base + 0.1, base, base - 0.05, base - 0.1],
    }
    pm = {
        "all": base + 0.05,
        "many": base + 0.15,
        "medium": base + 0.05,
        "few": base - 0.05,
        "balancedness": base - 0.15,
    }
    train = {"conflict-rate": 0.3 + 0.01 * seed} if method.startswith("fedpurel") else {}
    rounds = [{"round": r, "phase": "global", "gm": gm, "train": train, "wall_time": float(r)} for r in (1, 2)]
    rounds.append({"round": 3, "phase": "personal", "pm": pm, "wall_time": 3.0})
    return {
        # results.json's config is cfg.to_flower(): flat dotted keys ("args" is the fake's own record)
        "config": {"method.name": method, "seed": seed, "peft.name": variant, "args": args},
        "method": {"name": method, "reports": REPORTS.get(method, ["gm", "pm"])},
        "class_counts": COUNTS,
        "zero_shot": {"gm": {**gm, "all": 0.5, "per_class": [0.5] * 4}, "pm": {**pm, "all": 0.55}},
        "rounds": rounds,
        "final": {"gm": gm, "pm": pm, "wall_time": 3.5},
    }


def barrier(spec: str, timeout: float = 120.0) -> bool:
    """``<folder>:<n>``: arrive in the folder, then wait until n jobs have arrived (True), or give up
    after ``timeout`` seconds (False). n jobs pass it only if they all run at the same time."""
    import time

    folder, count = spec.rsplit(":", 1)
    (Path(folder) / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(Path(folder).iterdir())) < int(count):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main(args: list[str]) -> int:
    method = re.search(r"(?:^| )method\.name='([^']*)'", args[-1]).group(1)
    seed = int(re.search(r"(?:^| )seed=(\d+)", args[-1]).group(1))
    variant = re.search(r"(?:^| )peft\.name='([^']*)'", args[-1])
    variant = variant.group(1) if variant else "prompt"
    if os.environ.get("FAKE_RUN_BARRIER") and not barrier(os.environ["FAKE_RUN_BARRIER"]):
        print("fake run: the other jobs never came (they do not run side by side)", file=sys.stderr)
        return 3
    if os.environ.get("FAKE_RUN_LOG"):
        with open(os.environ["FAKE_RUN_LOG"], "a") as log:
            log.write(json.dumps(args) + "\n")
    output_dir = Path(os.environ["OUTPUT_DIR"])
    run_dir = output_dir / f"{len(list(output_dir.iterdir())):03d}-fake-{method}-seed{seed}"
    run_dir.mkdir(parents=True)
    results = fake_results(method, seed, args, variant)
    fail = os.environ.get("FAKE_RUN_FAIL") == f"{method}:{seed}"
    if fail:
        results["final"] = {}
    (run_dir / "results.json").write_text(json.dumps(results))
    print(f"fake run of {method} seed {seed}")
    if fail:
        print("fedpurel: run 1 ended with status finished:failed", file=sys.stderr)
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
