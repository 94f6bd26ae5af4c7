"""bench/gpu_check.py: its CPU mode end to end, its one-line import check, and the checks that
make it fail on a GPU when a process ran elsewhere or under another autocast."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _module()
CUDA_BF16 = {"device": "cuda", "precision": "bf16", "autocast": True, "dtype": "bfloat16"}


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_quick_cpu_mode_runs_the_inprocess_path_and_writes_the_report(tmp_path):
    report = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--cpu", "--modes", "inprocess", "--report", str(report)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: CPU (--cpu)" in proc.stdout or "gpu_check: CPU (no CUDA device)" in proc.stdout
    assert "tiny model" in proc.stdout.splitlines()[0]
    assert "gpu_check PASSED" in proc.stdout

    r = json.loads(report.read_text())
    assert r["ok"] is True and r["problems"] == []
    assert r["cuda"] is False and r["machine"].startswith("CPU")
    assert r["intended"] == {"device": "cpu", "precision": "fp32", "autocast": False, "dtype": "float32"}
    assert r["config"]["model.device"] == "cpu" and r["config"]["train.rounds"] == 1
    run = r["modes"]["inprocess"]["prompt"]
    assert run["ok"] is True
    assert run["observed"] == ["cpu no-autocast"]
    assert [x["phase"] for x in run["rounds"]] == ["global", "personal"]
    # Every one of the 4 quick clients was seen evaluating (zero-shot), training and personalizing.
    assert run["client_calls"] >= 3 * 4 and run["server_processes"] == 1
    assert run["peak_client_mib"] is None  # no GPU memory on the CPU

    b = r["bench"]
    assert b["features"]["images"] > 0 and b["features"]["images_per_s"] > 0
    step = b["variants"]["prompt"]
    assert step["classes"] == 20 and step["plain_ms"] > 0 and step["purified_ms"] > 0
    big = b["imagenet_lt_prompt"]
    assert big["classes"] == 1000 and big["purified_ms"] > 0
    assert {"text_no_grad_unchunked", "text_no_grad_chunked"} <= set(big)
    assert [x["classes"] for x in b["reference_prompt_step"]] == [20, 1000]
    assert all(x["ms"] > 0 for x in b["reference_prompt_step"])


@pytest.mark.parametrize("hidden", [["flwr"], ["flwr", "open_clip"]])
def test_a_missing_package_is_named_in_one_line(hidden):
    code = (
        "import runpy, sys\n"
        f"for name in {hidden!r}: sys.modules[name] = None\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--quick']\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    dists = {"flwr": "flwr", "open_clip": "open_clip_torch"}
    head, _, rest = lines[0].partition("gpu_check: missing Python packages: ")
    assert head == ""
    named = re.sub(r" \([^)]*\)", "", rest).replace("; ", ", ").split(", ")
    assert sorted(named) == sorted(dists[h] for h in hidden)
    assert rest.endswith("(in the wheels of scripts/gpu-wheels.sh: put them on PYTHONPATH)")


def _event(**changes):
    event = {
        "role": "client",
        "what": "train",
        "peft": "prompt",
        "pid": 11,
        "partition": 0,
        "device": "cuda:0",
        "precision": "bf16",
        "forward": [["cuda:0", True, "bfloat16", "bfloat16"]],
        "peak_allocated": 3 * 2**30,
        "peak_reserved": 4 * 2**30,
    }
    return {**event, **changes}


def _run_events(**changes):
    """A complete run of 2 clients on CUDA in bf16; ``changes`` alter partition 1's train call."""
    events = [_event(partition=p, what=w, pid=10 + p) for p in (0, 1) for w in ("train", "personalize")]
    events[2] = {**events[2], **changes}
    events.append(_event(role="server", what="evaluate_gm", pid=1, partition=None))
    del events[-1]["partition"]
    return events


def test_the_event_check_accepts_a_run_on_cuda_under_the_intended_autocast():
    problems, summary = gpu_check.check_events(_run_events(), "prompt", 2, CUDA_BF16)
    assert problems == []
    assert summary["observed"] == ["cuda bfloat16"]
    assert summary["client_processes"] == 2 and summary["server_processes"] == 1
    assert summary["peak_client_mib"] == 3072.0 and summary["peak_client_reserved_mib"] == 4096.0


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"device": "cpu", "forward": [["cpu", False, "", "float32"]]}, "ran on cpu, not cuda"),
        ({"forward": [["cuda:0", False, "", "float32"]]}, "autocast=False"),
        ({"forward": [["cuda:0", True, "float16", "float16"]]}, "autocast=True float16, not bfloat16"),
        ({"forward": [["cuda:0", True, "bfloat16", "float32"]]}, "logits in float32"),
        ({"precision": "fp32"}, "resolved precision fp32, not bf16"),
        ({"forward": []}, "no forward pass"),
    ],
)
def test_the_event_check_fails_when_a_client_left_the_intended_path(changes, says):
    problems, _ = gpu_check.check_events(_run_events(**changes), "prompt", 2, CUDA_BF16)
    assert any(says in p for p in problems), problems


def test_the_event_check_fails_when_a_partition_or_a_phase_was_not_seen():
    events = [e for e in _run_events() if e.get("partition") != 1]
    problems, _ = gpu_check.check_events(events, "prompt", 2, CUDA_BF16)
    assert any("partitions [1] were not observed" in p for p in problems), problems
    events = [e for e in _run_events() if e["what"] != "personalize"]
    problems, _ = gpu_check.check_events(events, "prompt", 2, CUDA_BF16)
    assert any("no ClientApp personalize call" in p for p in problems), problems


def test_the_event_check_fails_without_any_client_or_server():
    problems, _ = gpu_check.check_events([], "prompt", 2, CUDA_BF16)
    assert any("no ClientApp call" in p for p in problems)
    assert any("no server evaluation" in p for p in problems)


def test_the_results_check_reads_the_servers_own_device_record():
    rounds = [{"phase": "global"}, {"phase": "personal"}]
    good = {"device": {"device": "cuda:0", "precision": "bf16"}, "rounds": rounds}
    assert gpu_check.check_results(good, CUDA_BF16) == []
    on_cpu = {"device": {"device": "cpu", "precision": "fp32"}, "rounds": rounds}
    assert len(gpu_check.check_results(on_cpu, CUDA_BF16)) == 2
    assert "no 'device' record" in gpu_check.check_results({"rounds": rounds}, CUDA_BF16)[0]
    assert "missing" in gpu_check.check_results({**good, "rounds": rounds[:1]}, CUDA_BF16)[0]


def test_intended_follows_the_apps_precision_rule():
    assert gpu_check.intended(False) == {"device": "cpu", "precision": "fp32", "autocast": False, "dtype": "float32"}
    assert gpu_check.intended(False, "bf16")["dtype"] == "bfloat16"
    assert gpu_check.intended(True, "fp16") == {
        "device": "cuda",
        "precision": "fp16",
        "autocast": True,
        "dtype": "float16",
    }


def test_the_fabricated_cifar100_loads_through_the_apps_reader(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    from fedpurel_app.data.cifar import load_cifar

    root = gpu_check.fabricate_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    # What the probe does in every process of a run: existence checked, torchvision's MD5 bypassed.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    bundle = load_cifar("cifar100-lt", root)
    assert len(bundle.train) == 200 and len(bundle.test) == 100
    assert bundle.train.images.shape[1:] == (32, 32, 3)
    assert len(bundle.classnames) == 100 and "aquarium fish" in bundle.classnames
