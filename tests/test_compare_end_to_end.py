"""The comparison runner (`fedpurel compare`) end to end: real `flwr run` jobs, then the report; a rerun resumes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL = (
    "train.rounds=2 personalize.rounds=1 train.local-epochs=1 personalize.epochs=1 train.fraction=0.5 "
    "data.client-test-size=40"
)


def compare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "NUM_SUPERNODES": "4",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": "300000000",
    }
    return subprocess.run(
        [sys.executable, "-m", "fedpurel_cli.main", "compare", "--out", str(tmp_path / "cmp"), *args, SMALL],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_two_methods_run_report_and_resume(tmp_path):
    proc = compare(tmp_path, "--methods", "fedpurel,promptfl-la", "--seeds", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "seed 0" in line]
    assert len(lines) == 2 and all(" done " in line for line in lines), proc.stdout

    out = tmp_path / "cmp"
    table = (out / "results.md").read_text()
    for row in ("zero-shot", "fedpurel", "promptfl-la"):
        assert f"| {row}" in table, table
    rows = {row["method"]: row for row in csv.DictReader((out / "results.csv").open()) if row["row"] == "mean"}
    assert float(rows["fedpurel"]["pm_all"]) > 0 and float(rows["promptfl-la"]["gm_all"]) > 0
    assert rows["promptfl-la"]["pm_all"] == ""  # a global method reports no PM
    for results in (out / "runs").rglob("results.json"):
        config = json.loads(results.read_text())["config"]
        assert config["method.name"] in ("fedpurel", "promptfl-la") and config["seed"] == 0
        assert config["train.rounds"] == 2 and config["data.client-test-size"] == 40
    for png in ("accuracy_per_round", "many_medium_few", "per_class_vs_count", "conflict_rate"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    again = compare(tmp_path, "--methods", "fedpurel,promptfl-la", "--seeds", "0")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped") == 2, again.stdout
