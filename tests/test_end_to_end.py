"""The README's main command end to end: `scripts/run.sh` -> `flwr run .` in Ray simulation.

Small configs (4 SuperNodes, 2 + 1 rounds) keep each run under a minute.
"""

import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_app(tmp_path: Path, overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "outputs"
    env = {
        **os.environ,
        "NUM_SUPERNODES": "4",
        "OUTPUT_DIR": str(out),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": "300000000",
    }
    proc = subprocess.run(
        ["bash", "scripts/run.sh", overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def flower_processes(flwr_home: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if str(flwr_home) in line]


def only_results(out: Path) -> dict:
    (path,) = out.glob("*/results.json")
    assert (path.parent / "phi_g.safetensors").is_file()
    return json.loads(path.read_text())


SMALL = "train.rounds=2 personalize.rounds=1 train.local-epochs=1 train.fraction=0.5 data.client-test-size=40"


def test_default_schedule_writes_complete_results(tmp_path):
    proc, out = run_app(tmp_path, SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = only_results(out)
    assert results["config"]["train.rounds"] == 2 and results["config"]["method.name"] == "fedpurel"
    for gm in (results["zero_shot"]["gm"], results["final"]["gm"]):
        for key in ("all", "many", "medium", "few", "balancedness"):
            assert 0.0 <= gm[key] <= 1.0
        assert len(gm["per_class"]) == 20
    assert set(results["final"]["gm_last10"]) >= {"all", "many", "medium", "few", "balancedness"}
    pm = results["final"]["pm"]
    assert 0.0 <= pm["all"] <= 1.0 and 0.0 <= pm["all_weighted"] <= 1.0 and pm["personalized"]
    assert pm["num_clients"] == 4
    phases = [(r["round"], r["phase"]) for r in results["rounds"]]
    assert phases == [(1, "global"), (2, "global"), (3, "personal")]
    first = results["rounds"][0]
    assert first["train"]["clients"] == 4, "round 1 samples every client"
    assert results["rounds"][1]["train"]["clients"] == 2, "then train.fraction of them"
    assert 0.0 <= first["train"]["conflict-rate"] <= 1.0 and "mean-cosine" in first["train"]
    assert all("wall_time" in r for r in results["rounds"])
    assert "zero-shot" in proc.stdout and "results:" in proc.stdout
    # Progress: one concise line per round with its phase, accuracy and elapsed time.
    progress = re.findall(
        r"\[fedpurel\] round (\d)/3 (global|personal) +(GM|PM) all +\d+\.\d.*\| *\d+\.\ds", proc.stdout
    )
    assert [(r, p) for r, p, _ in progress] == [("1", "global"), ("2", "global"), ("3", "personal")], proc.stdout[
        -3000:
    ]
    assert flower_processes(tmp_path / "flwr-home") == [], "processes left running"


def test_interleaved_schedule_with_kl_and_flat_purification(tmp_path):
    proc, out = run_app(
        tmp_path,
        SMALL + " method.fedpurel-kl.schedule='interleaved' method.name='fedpurel-kl'"
        " method.fedpurel-kl.granularity='flat'",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = only_results(out)
    assert [r["phase"] for r in results["rounds"]] == ["global", "global"]
    assert all("pm" in r and "gm" in r for r in results["rounds"])
    assert results["final"]["pm"]["personalized"]


def test_a_bad_config_stops_before_training_with_one_clear_message(tmp_path):
    """Known keys with bad values reach the ServerApp: it stops with one FedPuReL message that
    names every bad key, no traceback of the user error, and Flower records the run as failed."""
    proc, out = run_app(tmp_path, "peft.prompt.lr=-1.0 method.name='tkl2'")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    (stopped,) = [line for line in text.splitlines() if "FedPuReL run stopped:" in line]
    assert "Invalid run config" in stopped, text[-3000:]
    assert "key 'peft.prompt.lr': value -1.0 is invalid" in text and "key 'method.name': value 'tkl2'" in text
    assert "Traceback" not in text and "ConfigError" not in text.replace("FedPuReL run stopped", ""), text[-3000:]
    assert "ended with status finished:failed" in text, text[-3000:]
    assert "[fedpurel] round" not in text, "training started"
    assert not list(out.glob("*/results.json")), "a results file was written for a refused config"
    assert flower_processes(tmp_path / "flwr-home") == []


def test_an_unknown_key_stops_before_flower_starts_with_one_line(tmp_path):
    proc, out = run_app(tmp_path, "train.roundz=3")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "unknown run-config key 'train.roundz' (did you mean 'train.rounds'?)" in text, text[-3000:]
    assert "Traceback" not in text and "Successfully started run" not in text
    assert not out.exists() or not list(out.glob("*/results.json"))
    assert flower_processes(tmp_path / "flwr-home") == []


def test_a_run_whose_server_app_fails_exits_non_zero_with_its_status(tmp_path):
    """No reply can arrive within 1 ms, so round 1 has no valid reply and the ServerApp raises:
    `flwr run --stream` itself exits 0, the script must not."""
    proc, out = run_app(tmp_path, SMALL + " round-timeout=0.001")
    assert proc.returncode != 0, proc.stdout[-3000:]
    text = proc.stdout + proc.stderr
    assert "ended with status finished:failed" in text, text[-3000:]
    assert "results:" not in proc.stdout
    assert flower_processes(tmp_path / "flwr-home") == []


def test_progress_lines_show_as_they_are_logged_whatever_the_environment(tmp_path):
    """Each round's line reaches the terminal when it is logged, not in a block with later ones,
    also where PYTHONUNBUFFERED is not set (the log goes through a pipe): the lines of rounds 1
    and 3 arrive about as far apart as the ServerApp's own clock says they were logged."""
    import time

    env = {
        **os.environ,
        "NUM_SUPERNODES": "4",
        "OUTPUT_DIR": str(tmp_path / "outputs"),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": "300000000",
    }
    env.pop("PYTHONUNBUFFERED", None)
    overrides = SMALL + " train.local-epochs=25 personalize.epochs=25"
    proc = subprocess.Popen(
        ["bash", "scripts/run.sh", overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    arrived, logged, lines = {}, {}, []
    for line in proc.stdout:
        lines.append(line)
        if match := re.search(r"\[fedpurel\] round (\d)/3 .*\| *(\d+\.\d)s", line):
            arrived[match[1]], logged[match[1]] = time.monotonic(), float(match[2])
    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    assert set(arrived) == {"1", "2", "3"}, "".join(lines)[-3000:]
    apart = logged["3"] - logged["1"]
    assert apart >= 2.0, f"rounds 2-3 took {apart} s: too short to tell"
    assert arrived["3"] - arrived["1"] > 0.5 * apart
