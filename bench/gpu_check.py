"""Ready for the GPU: one command that runs FedPuReL at the paper's model size on one GPU and checks it.

    python bench/gpu_check.py                       # everything this machine can run (sized for 8 minutes on one GPU)
    python bench/gpu_check.py --quick --cpu --modes inprocess   # a reduced run on the CPU (the test's)
    python bench/gpu_check.py --modes deployment --no-bench     # one part: inprocess, deployment, simulation
    python bench/gpu_check.py --set "model.precision='fp16'"    # any run-config override (checked against it)

On a machine with CUDA it builds CLIP ViT-B/16 at its real size (open_clip's
seeded random initial weights saved as a checkpoint file and loaded through the
app's own ``model.pretrained = <file>`` path, as ``bench/real_size.py``) and a
fabricated CIFAR-100-LT in its real on-disk format: torchvision's
``cifar-100-python/{train,test,meta}`` pickles of 32x32 images (random pixels,
the real class names; torchvision's MD5 comparison is bypassed, existence is
still checked). Then, for each of ``prompt``, ``adapter`` and ``lora``, 2
Stage-1 rounds and 1 personalization round of ``fedpurel``:

- ``inprocess``: the plain loop of ``bench/inprocess.py`` (8 clients, this process);
- ``deployment``: a loopback federation, ``deploy/start.sh --insecure`` (a
  SuperLink and 4 SuperNodes sharing the GPU, no Ray), ``deploy/run.sh`` once
  per variant, ``deploy/stop.sh``;
- ``simulation`` (where Ray is installed): ``scripts/run.sh`` with 4 SuperNodes
  and ``CLIENT_GPUS=0.25``; it waits for the local SuperLink's port (39091)
  when someone else's simulation holds it.

It checks that the server and every ClientApp ran on CUDA under the intended
autocast (bf16 where the GPU supports it, else fp16) and fails loudly
otherwise. The server says so in its results.json (``"device"``, written by
``fedpurel_app.server.ServerRun``); every client process is observed by a probe
that this command puts on ``PYTHONPATH`` (a ``sitecustomize``, as
``bench/startup_trace.py`` does; it chains to the environment's own): after
every ``Client.train / personalize / evaluate`` and ``ServerRun.evaluate_gm``
it appends one JSON line (process id, partition, device, precision, the
autocast state and logits dtype seen in every forward pass, peak GPU memory) to
a file named by ``FEDPUREL_GPU_CHECK``. Nothing of it enters a reply. The same
probe lets the fabricated CIFAR pass torchvision's MD5 check in every process.

``bench`` (part of every run) records purified and plain Stage-1 step times
(batch 32, client 0), feature-extraction images/s, peak GPU memory
(``torch.cuda.max_memory_allocated``), the same step time and memory for the
prompt over ImageNet-LT's 1,000 classes, and the step of the reference code's
way (image encoder in every step, full 77-token text passes, two backward
passes) at the run's classes (100 for CIFAR-100) and at 1,000. It writes one JSON report and prints a table;
it exits 1 when a check failed, 2 when something it needs is missing.

Without CUDA (or with ``--cpu``) the same command runs the same path with the
tiny model (``fedpurel-tiny``, the embedded data with a smaller long tail: about
300 train images) on the CPU and says so (``--data cifar``: the fabricated CIFAR
with a randomly initialised tiny model instead). ``--quick``: 1 Stage-1 round,
the prompt only, 4 in-process clients, 1 timed repeat (and batch 32 on the CPU).

On a GPU machine with Python 3.12 and a CUDA torch but no package index, carry
the wheels of ``scripts/gpu-wheels.sh`` and install them first (the command
checks its imports and names what is missing in one line):

    python3 -m pip install -q --no-index --no-deps --no-compile --target ~/fedpurel-site .whl/*.whl
    PYTHONPATH=~/fedpurel-site PATH=~/fedpurel-site/bin:$PATH python3 bench/gpu_check.py
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pickle
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (module, the distribution that provides it): what the check, the app and Flower's processes import.
REQUIRED = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("numpy", "numpy"),
    ("safetensors", "safetensors"),
    ("PIL", "pillow"),
    ("tqdm", "tqdm"),
    ("peft", "peft"),  # the lora variant's LoRA layers
    ("timm", "timm"),  # open_clip's declared dependency
    ("pydantic", "pydantic"),
    ("pydantic_core", "pydantic-core"),
    ("annotated_types", "annotated-types"),
    ("typing_inspection", "typing-inspection"),
    ("typing_extensions", "typing-extensions"),
    ("open_clip", "open_clip_torch"),
    ("ftfy", "ftfy"),
    ("wcwidth", "wcwidth"),
    ("regex", "regex"),
    ("huggingface_hub", "huggingface-hub"),
    ("tensorboard", "tensorboard"),
    ("matplotlib", "matplotlib"),
    ("flwr", "flwr"),
    ("grpc", "grpcio"),
    ("grpc_health", "grpcio-health-checking"),
    ("google.protobuf", "protobuf"),
    ("cryptography", "cryptography"),
    ("cffi", "cffi"),
    ("Crypto", "pycryptodome"),
    ("iterators", "iterators"),
    ("tomli", "tomli"),
    ("tomli_w", "tomli-w"),
    ("typer", "typer"),
    ("click", "click"),
    ("rich", "rich"),
    ("yaml", "pyyaml"),
    ("requests", "requests"),
    ("httpx", "httpx"),
    ("pathspec", "pathspec"),
    ("packaging", "packaging"),
    ("prompt_toolkit", "prompt-toolkit"),
    ("sqlalchemy", "sqlalchemy"),
    ("alembic", "alembic"),
    ("mako", "mako"),
    ("uvicorn", "uvicorn"),
    ("fastapi", "fastapi"),
    ("starlette", "starlette"),
)
# Imported as a whole once the modules are there: a version that does not fit fails here, in one line.
APP_IMPORTS = ("open_clip", "flwr.cli.app", "flwr.server", "client_app.app", "server_app.app", "fedpurel_cli.main")
FLOWER_COMMANDS = (
    "flwr",
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
)

VARIANTS = ("prompt", "adapter", "lora")
MODES = ("inprocess", "deployment", "simulation")
INPROCESS_CLIENTS = 8
FLOWER_NODES = 4
SIMULATION_PORT = 39091  # the local SuperLink of scripts/run.sh
IMAGENET_LT_CLASSES = 1000

CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

# --- the probe every process of a run loads (written next to a sitecustomize.py) ------------------------

PROBE = r'''
"""bench/gpu_check.py's probe: where each client and server call computed, under which autocast.

Loaded by the sitecustomize beside it when FEDPUREL_GPU_CHECK names an events file (JSON lines).
"""
import importlib.abc
import json
import os
import sys
import time

_state = {"file": os.environ.get("FEDPUREL_GPU_CHECK", ""), "seen": set()}
_PATCHES = {}


def set_events(path):
    _state["file"] = str(path)


def _write(record):
    if not _state["file"]:
        return
    record.update(pid=os.getpid(), process=os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python")
    record["time"] = time.time()
    with open(_state["file"], "a") as f:
        f.write(json.dumps(record) + "\n")


def _peaks():
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None, None
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def _observe(role, what, device, precision, **extra):
    seen, _state["seen"] = sorted(_state["seen"]), set()
    allocated, reserved = _peaks()
    _write(
        {
            "role": role,
            "what": what,
            "device": str(device),
            "precision": precision,
            "forward": [list(s) for s in seen],
            "peak_allocated": allocated,
            "peak_reserved": reserved,
            **extra,
        }
    )


def _cifar(module):
    module.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)


def _peft(module):
    import torch

    cls = module.PeftVariant
    original = cls.branch_logits

    def branch_logits(self, branch, x):
        out = original(self, branch, x)
        kind = x.device.type
        on = bool(torch.is_autocast_enabled(kind))
        dtype = str(torch.get_autocast_dtype(kind)).replace("torch.", "") if on else ""
        _state["seen"].add((str(x.device), on, dtype, str(out.dtype).replace("torch.", "")))
        return out

    cls.branch_logits = branch_logits


def _client(module):
    cls = module.Client
    for name in ("train", "personalize", "evaluate"):
        original = getattr(cls, name)

        def call(self, phi_g, _original=original, _name=name):
            _state["seen"] = set()
            result = _original(self, phi_g)
            _observe(
                "client", _name, self.clip.device, self.precision,
                partition=self.node.partition_id, peft=self.cfg.peft.name, run=self.instruction.run,
            )
            return result

        setattr(cls, name, call)


def _server(module):
    cls = module.ServerRun
    original = cls.evaluate_gm

    def evaluate_gm(self):
        _state["seen"] = set()
        result = original(self)
        device = self.test.features.device
        _observe("server", "evaluate_gm", device, self.precision, peft=self.cfg.peft.name, run=self.tag)
        return result

    cls.evaluate_gm = evaluate_gm


_PATCHES.update(
    {
        "torchvision.datasets.cifar": _cifar,
        "fedpurel_app.peft.base": _peft,
        "fedpurel_app.client": _client,
        "fedpurel_app.server": _server,
    }
)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches each watched module right after its first import."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _PATCHES.pop(fullname)(module)

        spec.loader.exec_module = exec_module
        return spec


def install():
    for name in [n for n in _PATCHES if n in sys.modules]:
        _PATCHES.pop(name)(sys.modules[name])
    if _PATCHES and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
'''

SITECUSTOMIZE = r"""
import os
import sys

if os.environ.get("FEDPUREL_GPU_CHECK"):
    import fedpurel_gpu_probe

    fedpurel_gpu_probe.install()

# This file shadows the environment's own sitecustomize: run that one too.
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in list(sys.path):
    _file = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.abspath(_entry or ".") != _here and os.path.isfile(_file):
        import importlib.util

        _spec = importlib.util.spec_from_file_location("_fedpurel_chained_sitecustomize", _file)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
"""


class CheckFailed(Exception):
    """A check of the run failed: the command exits 1."""


# --- imports --------------------------------------------------------------------------------------------


def missing_modules(required=REQUIRED) -> list[str]:
    """The distributions whose module cannot be found (not imported: fast)."""
    missing = []
    for module, dist in required:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found and dist not in missing:
            missing.append(dist)
    return missing


def _normal(dist: str) -> str:
    return dist.lower().replace("_", "-")


def wheel_names() -> set[str]:
    """The distributions scripts/gpu-wheels.sh downloads (its ``name==version`` lines)."""
    script = ROOT / "scripts" / "gpu-wheels.sh"
    if not script.is_file():
        return set()
    lines = [line.strip() for line in script.read_text().splitlines()]
    return {_normal(line.split("==")[0]) for line in lines if "==" in line and " " not in line}


def check_imports(modes: list[str]) -> str | None:
    """One line naming what is missing, or None when everything needed imports."""
    missing = missing_modules()
    if missing:
        carried = wheel_names()
        ours = [d for d in missing if _normal(d) in carried]
        theirs = [d for d in missing if _normal(d) not in carried]
        parts = []
        if ours:
            parts.append(f"{', '.join(ours)} (in the wheels of scripts/gpu-wheels.sh: put them on PYTHONPATH)")
        if theirs:
            parts.append(f"{', '.join(theirs)} (not in those wheels: install {'it' if len(theirs) == 1 else 'them'})")
        return f"gpu_check: missing Python packages: {'; '.join(parts)}"
    for module in APP_IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as err:  # a version mismatch shows as any error
            return f"gpu_check: 'import {module}' fails: {type(err).__name__}: {str(err).splitlines()[0]}"
    if "deployment" in modes or "simulation" in modes:
        missing = [c for c in FLOWER_COMMANDS if shutil.which(c) is None]
        if missing:
            return f"gpu_check: Flower's commands not on PATH: {', '.join(missing)} (add the wheels' bin folder)"
    return None


def flower_bin_on_path() -> None:
    """Flower's console scripts from a ``pip install --target`` folder on sys.path onto PATH."""
    if shutil.which("flwr"):
        return
    candidates = [Path(sys.executable).parent] + [Path(e) / "bin" for e in sys.path if e]
    for folder in candidates:
        if (folder / "flwr").is_file():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def fedpurel_command(bin_dir: Path) -> None:
    """deploy/run.sh and scripts/run.sh call ``fedpurel`` (the project's console script, in .venv):
    where it is not installed, a shim of it in ``bin_dir``, put on PATH."""
    if shutil.which("fedpurel"):
        return
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "fedpurel"
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from fedpurel_cli.main import main; sys.exit(main())"
    shim.write_text(f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n')
    shim.chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


# --- data and model -------------------------------------------------------------------------------------


def fabricate_cifar100(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """CIFAR-100 in torchvision's on-disk format (``cifar-100-python/{train,test,meta}`` pickles:
    'data' uint8 [N, 3072] rows of R, G, B planes, 'fine_labels', 'coarse_labels'; meta
    'fine_label_names'): random 32x32 images, the real class names."""
    import numpy as np

    folder = root / "cifar-100-python"
    if (folder / "meta").is_file():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.tile(np.arange(100), per_class)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        record = {
            "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{name} batch",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": data,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(record, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return root


def random_checkpoint(model_name: str) -> str:
    from real_size import random_checkpoint as build

    from fedpurel_app.models import register_model_configs

    register_model_configs()
    return build(model_name)


def link_embedded_checkpoints(cache: Path) -> None:
    """The embedded tiny CLIP's pretrained checkpoints of the default cache, linked into ``cache``
    (else the run would pretrain it again there, about a minute)."""
    from fedpurel_app.models import default_cache_dir

    cache.mkdir(parents=True, exist_ok=True)
    for path in Path(default_cache_dir()).glob("fedpurel-tiny__*.safetensors"):
        if not (cache / path.name).exists():
            (cache / path.name).symlink_to(path)


def base_config(args, work: Path, cuda: bool) -> dict:
    """Run-config overrides (dotted keys) shared by every mode and variant."""
    run = {
        "train.rounds": 1 if args.quick else 2,
        "personalize.rounds": 1,
        "train.local-epochs": 1,
        "personalize.epochs": 1,
        "train.fraction": 0.4,
        "train.all-clients-first-round": True,
        "method.name": "fedpurel",
        "model.cache-dir": str(work / "cache"),
        "eval-every": 1,
    }
    if args.data == "cifar":
        model = "ViT-B-16" if cuda else "fedpurel-tiny"
        run.update(
            {
                "data.name": "cifar100-lt",
                "data.root": str(fabricate_cifar100(work / "data", args.train_per_class, args.test_per_class)),
                "data.n-max": args.train_per_class,
                "data.imbalance-factor": 100.0,
                "data.client-test-size": max(10, args.test_per_class * 5),
                "model.name": model,
                "model.pretrained": random_checkpoint(model),
                "train.batch-size": 32,
                "peft.prompt.n-ctx": 4,
                "peft.prompt.ctx-init": "",
            }
        )
        for variant in VARIANTS:  # the presets' learning rates (configs/cifar100-lt-*.toml)
            run[f"peft.{variant}.lr"] = 0.001
            run[f"peft.{variant}.personal-lr"] = 0.001
    else:
        link_embedded_checkpoints(work / "cache")
        # A smaller long tail than the default (about 300 train images over the clients, 10 test images
        # each): the CPU mode checks the path, its times are not the point.
        run.update({"data.n-max": 40, "data.imbalance-factor": 10.0, "data.client-test-size": 10})
        if args.quick:  # half the steps (the text tower's backward pass is most of a prompt step)
            run["train.batch-size"] = 32
    if not cuda:  # also where CUDA is present but --cpu was given
        run["model.device"] = "cpu"
    run.update(args.set)
    return run


# --- checks ---------------------------------------------------------------------------------------------


def intended(cuda: bool, precision: str = "auto") -> dict:
    """Device type, precision and autocast dtype a run must use here (``precision``: the run's
    ``model.precision``; 'auto' resolves as the app does: bf16 or fp16 on CUDA, fp32 on the CPU)."""
    if precision == "auto":
        import torch

        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    on = precision != "fp32"
    return {"device": "cuda" if cuda else "cpu", "precision": precision, "autocast": on, "dtype": _DTYPES[precision]}


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_events(events: list[dict], variant: str, nodes: int, want: dict) -> tuple[list[str], dict]:
    """Problems with what the probe saw of one run's processes, and a summary of them."""
    problems: list[str] = []
    mine = [e for e in events if e.get("peft") == variant]
    clients = [e for e in mine if e["role"] == "client"]
    servers = [e for e in mine if e["role"] == "server"]
    if not clients:
        problems.append("no ClientApp call was observed (the probe did not load, or no client ran)")
    if not servers:
        problems.append("no server evaluation was observed")
    partitions = {e["partition"] for e in clients}
    if clients and partitions != set(range(nodes)):
        problems.append(f"partitions {sorted(set(range(nodes)) - partitions)} were not observed")
    for kind in ("train", "personalize"):
        if clients and not any(e["what"] == kind for e in clients):
            problems.append(f"no ClientApp {kind} call was observed")
    for e in mine:
        who = f"{e['role']} {e['what']} (pid {e['pid']}" + (
            f", partition {e['partition']})" if "partition" in e else ")"
        )
        if not e["device"].startswith(want["device"]):
            problems.append(f"{who} ran on {e['device']}, not {want['device']}")
        if e["precision"] != want["precision"]:
            problems.append(f"{who} resolved precision {e['precision']}, not {want['precision']}")
        if not e["forward"]:
            problems.append(f"{who}: no forward pass was observed")
        for device, on, dtype, out in e["forward"]:
            if not device.startswith(want["device"]):
                problems.append(f"{who}: a forward pass on {device}")
            elif on != want["autocast"] or (on and dtype != want["dtype"]):
                problems.append(f"{who}: a forward pass under autocast={on} {dtype or ''}, not {want['dtype']}")
            elif out != want["dtype"]:
                problems.append(f"{who}: logits in {out}, not {want['dtype']}")
    peaks: dict[int, int] = {}
    reserved: dict[int, int] = {}
    for e in mine:
        if e.get("peak_allocated") is not None:
            peaks[e["pid"]] = max(peaks.get(e["pid"], 0), e["peak_allocated"])
            reserved[e["pid"]] = max(reserved.get(e["pid"], 0), e["peak_reserved"] or 0)
    client_pids = {e["pid"] for e in clients}
    server_pids = {e["pid"] for e in servers}
    seen = set()
    for e in mine:
        for device, on, dtype, _ in e["forward"]:
            seen.add(f"{device.split(':')[0]} {dtype if on else 'no-autocast'}")
    summary = {
        "observed": sorted(seen),
        "client_calls": len(clients),
        "client_processes": len(client_pids),
        "server_processes": len(server_pids),
        "peak_client_mib": _mib(max((peaks[p] for p in client_pids if p in peaks), default=None)),
        "peak_server_mib": _mib(max((peaks[p] for p in server_pids if p in peaks), default=None)),
        # What the caching allocator held (the figure for packing, plus each process's CUDA context).
        "peak_client_reserved_mib": _mib(max((reserved[p] for p in client_pids if p in reserved), default=None)),
        "peak_server_reserved_mib": _mib(max((reserved[p] for p in server_pids if p in reserved), default=None)),
    }
    return problems[:20], summary


def check_results(results: dict, want: dict) -> list[str]:
    """The server's own record (results.json "device") and a complete run."""
    problems = []
    device = results.get("device")
    if not device:
        problems.append("results.json has no 'device' record")
    else:
        if not str(device.get("device", "")).startswith(want["device"]):
            problems.append(f"the server ran on {device.get('device')}, not {want['device']}")
        if device.get("precision") != want["precision"]:
            problems.append(f"the server's precision is {device.get('precision')}, not {want['precision']}")
    phases = [r["phase"] for r in results.get("rounds", [])]
    if "global" not in phases or "personal" not in phases:
        problems.append(f"the run's rounds are {phases}: missing a Stage-1 or a personalization round")
    return problems


def round_seconds(results: dict) -> list[dict]:
    """Each round's phase and duration (the first counts from the server's start: set-up, zero-shot)."""
    out, previous = [], 0.0
    for r in results.get("rounds", []):
        if r["phase"] == "final":
            continue
        out.append({"round": r["round"], "phase": r["phase"], "seconds": round(r["wall_time"] - previous, 2)})
        previous = r["wall_time"]
    return out


def _mib(value) -> float | None:
    return None if value is None else round(value / 2**20, 1)


# --- the measurements -----------------------------------------------------------------------------------


class Timer:
    """Wall time of a call, the device synchronised around it."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def __call__(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


class Memory:
    """Peak GPU memory of what runs inside, above what was allocated before (MiB); None on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        return False

    def report(self) -> dict:
        if not self.cuda:
            return {"peak_mib": None, "above_resident_mib": None}
        return {"peak_mib": _mib(self.peak), "above_resident_mib": _mib(self.peak - self.before)}


def _median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 3)


def step_bench(cfg, clip, peft, x, y, z, repeats: int, cuda: bool) -> dict:
    """Plain and purified Stage-1 steps on one batch, interleaved; medians and peak memory."""
    import torch
    from common import stage1_options

    from fedpurel_app.training import stage1_step

    timer, start = Timer(cuda), peft.global_state()
    base = stage1_options(cfg, clip)
    opts = {"plain": replace(base, align="none"), "purified": replace(base, align=base.align)}
    if opts["purified"].align == "none":
        opts["purified"] = replace(base, align="tkl")
    params = peft.global_parameters()

    def step(name):
        peft.load_global_state(start)
        o = opts[name]
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return timer(lambda: stage1_step(peft, x, y, z, optimizer, o))

    if repeats > 1:
        step("plain"), step("purified")  # warm-up
    times = {"plain": [], "purified": []}
    memory = {}
    for name in ("plain", "purified"):
        with Memory(cuda) as m:
            if cuda:  # a step of its own: the peak without the timer's synchronisations between steps
                step(name)
        memory[name] = m.report()
    for _ in range(repeats):
        for name in times:
            times[name].append(step(name))
    peft.load_global_state(start)
    plain, purified = _median_ms(times["plain"]), _median_ms(times["purified"])
    return {
        "batch": int(x.shape[0]),
        "inputs": list(x.shape),
        "plain_ms": plain,
        "purified_ms": purified,
        "ratio": round(purified / plain, 3),
        "memory": memory,
    }


def full_text_features(peft, clip, classnames: tuple[str, ...]):
    """The reference code's text pass: every class prompt at the tokenizer's full context (77 for
    real CLIP), context vectors of phi_g inserted, pooled at the EOT token."""
    import torch
    import torch.nn.functional as F

    tower = peft._tower[0]
    n_ctx = peft.phi_g.ctx.shape[0]
    tokens = clip.tokenizer([" ".join(["X"] * n_ctx) + f" {name}." for name in classnames]).to(clip.device)
    with torch.no_grad():
        embedding = tower.token_embedding(tokens)
    ctx = peft.phi_g.ctx.unsqueeze(0).expand(len(classnames), -1, -1)
    x = torch.cat([embedding[:, :1], ctx, embedding[:, 1 + n_ctx :]], dim=1) + tower.positional_embedding
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
    x = x[torch.arange(len(classnames), device=x.device), tokens.argmax(dim=-1)]
    projection = tower.text_projection
    x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return F.normalize(x, dim=-1)


def reference_step_bench(cfg, clip, peft, pixels, y, z, classnames, repeats: int, cuda: bool) -> dict:
    """The reference loop's prompt step: image encoder on the batch, full-context text pass over all
    classes, two separate backward passes (task, align), purification, SGD."""
    import torch
    import torch.nn.functional as F
    from common import stage1_options

    from fedpurel_app.purification import purify_stacked_with_stats
    from fedpurel_app.tkl import temperature_aligned_kl
    from fedpurel_app.training import autocast

    opts = stage1_options(cfg, clip)
    timer, params = Timer(cuda), peft.global_parameters()
    optimizer = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)

    def step():
        with autocast(clip.device, opts.precision):
            with torch.no_grad():
                image = clip.model.encode_image(pixels, normalize=True)
            logits = peft.logit_scale * image @ full_text_features(peft, clip, classnames).T
        logits = logits.float()
        task = F.cross_entropy(logits, y)
        align = temperature_aligned_kl(logits, z, tau_min=opts.tau_min, tau_max=opts.tau_max)
        g_task = torch.autograd.grad(task, params, retain_graph=True)
        g_align = torch.autograd.grad(align, params)
        grads, _ = purify_stacked_with_stats([torch.stack([a, b]) for a, b in zip(g_task, g_align, strict=True)])
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = peft.global_state()
    if repeats > 1:
        timer(step)  # warm-up
    with Memory(cuda) as m:
        if cuda:
            step()
    times = [timer(step) for _ in range(repeats)]
    peft.load_global_state(start)
    return {"classes": len(classnames), "batch": int(pixels.shape[0]), "ms": _median_ms(times), "memory": m.report()}


def bench(cfg_of, args, cuda: bool) -> dict:
    """Step times, feature extraction and memory, in this process."""
    import numpy as np
    import torch
    from common import node

    from fedpurel_app.data.client import client_data, global_test
    from fedpurel_app.inputs import client_feature_sets, clip_of, feature_cache_dir
    from fedpurel_app.models import encode_images, preprocess_images
    from fedpurel_app.peft.base import build_peft, input_kind
    from fedpurel_app.peft.prompt import PromptPeft

    repeats = args.repeats or (20 if cuda else 5)
    out: dict = {"repeats": repeats, "variants": {}, "seconds": {}}
    mark = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        out["seconds"][name] = round(now - mark[0], 1)
        mark[0] = now

    cfg = cfg_of("prompt")
    clip = clip_of(cfg.model, cfg.data)
    timer = Timer(cuda)
    lap("model")

    # Feature extraction: the app's encode_images (preprocessing on the CPU, the encoder without autocast).
    test = global_test(cfg.data).test
    count = min(len(test), (512 if args.quick else 2048) if cuda else (128 if args.quick else 512))
    split = test.subset(np.arange(count))
    encode_images(clip, test.subset(np.arange(min(count, 64))))  # warm-up
    seconds = timer(lambda: encode_images(clip, split))
    pre = timer(lambda: preprocess_images(clip.preprocess, split, 0, min(count, 512)))
    out["features"] = {
        "images": count,
        "images_per_s": round(count / seconds, 1),
        "preprocess_only_images_per_s": round(min(count, 512) / pre, 1),
    }
    lap("features")

    batch = cfg.train.batch_size
    for variant in args.variants:
        vcfg = cfg_of(variant)
        data = client_data(vcfg.data, vcfg.seed, node(0, args.clients))
        train, _ = client_feature_sets(clip, input_kind(variant), data, feature_cache_dir(vcfg.model))
        idx = (torch.arange(batch) % len(train)).to(train.labels.device)
        peft = build_peft(vcfg, clip, data.classnames, data.template)
        x, y, z = train.features[idx], train.labels[idx], train.zero_shot_logits[idx]
        out["variants"][variant] = step_bench(vcfg, clip, peft, x, y, z, repeats, cuda)
        out["variants"][variant]["classes"] = len(data.classnames)
        del peft, train, x
    lap("steps")

    # The prompt over ImageNet-LT's 1,000 classes (its class names on a real CLIP; numbered ones on the tiny).
    if not clip.name.startswith("fedpurel"):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = tuple(IMAGENET_CLASSNAMES)
    else:
        names = tuple(f"class {i}" for i in range(IMAGENET_LT_CLASSES))
    generator = torch.Generator().manual_seed(0)
    dim = clip.zero_shot_text(("a",), "{}").shape[-1]
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(clip.device)
    y = torch.randint(0, len(names), (batch,), generator=generator).to(clip.device)
    z = (torch.randn(batch, len(names), generator=generator) * 3).to(clip.device)
    big = PromptPeft(clip, names, n_ctx=4, ctx_init="", seed=0).to(clip.device)
    record = step_bench(cfg, clip, big, x, y, z, max(1, repeats // 4) if args.quick else max(3, repeats // 4), cuda)
    record["classes"] = len(names)
    record["tokens"] = int(big.positional.shape[0])
    with torch.no_grad():
        for label, chunk in (("text_no_grad_unchunked", len(names)), ("text_no_grad_chunked", PromptPeft.AUTO_CHUNK)):
            big.class_chunk = chunk
            with Memory(cuda) as m:
                big.text_features(big.phi_g)
            record[label] = m.report()
        big.class_chunk = 0
    out["imagenet_lt_prompt"] = record
    lap("imagenet_lt")

    # The reference code's way of a prompt step, at the run's classes and at 1,000.
    data = client_data(cfg.data, cfg.seed, node(0, args.clients))
    pixels = preprocess_images(clip.preprocess, data.train, 0, min(len(data.train), batch))
    pixels = pixels[torch.arange(batch) % pixels.shape[0]].to(clip.device)
    reference = []
    for classnames, labels in ((data.classnames, data.train.labels), (names, None)):
        peft = PromptPeft(clip, classnames, n_ctx=4, ctx_init="", seed=0).to(clip.device)
        yy = torch.as_tensor(np.resize(np.asarray(labels), batch)) if labels is not None else y.cpu()
        zz = (torch.randn(batch, len(classnames), generator=generator) * 3).to(clip.device)
        reference.append(
            reference_step_bench(
                cfg,
                clip,
                peft,
                pixels,
                yy.to(clip.device),
                zz,
                classnames,
                1 if args.quick else max(2, repeats // 5),
                cuda,
            )
        )
    out["reference_prompt_step"] = reference
    lap("reference")
    return out


# --- the runs -------------------------------------------------------------------------------------------


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "") + "'"
    return repr(value)


def overrides_string(run: dict) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in run.items())


def run_inprocess_mode(cfg_of, args, events: Path, want: dict, cuda: bool) -> dict:
    import fedpurel_gpu_probe
    import torch
    from inprocess import run_inprocess

    fedpurel_gpu_probe.set_events(events)
    out = {}
    for variant in args.variants:
        start = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = run_inprocess(cfg_of(variant), args.clients)
        problems = check_results(result["results"], want)
        event_problems, summary = check_events(read_events(events), variant, args.clients, want)
        out[variant] = {
            "ok": not (problems or event_problems),
            "problems": problems + event_problems,
            "wall_s": round(time.perf_counter() - start, 1),
            "rounds": round_seconds(result["results"]),
            "timings_s": {k: round(v, 2) for k, v in result["timings"].items()},
            "peak_process_mib": _mib(torch.cuda.max_memory_allocated()) if cuda else None,
            **summary,
        }
    return out


def _script(env: dict, *cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess, n: int = 1500) -> str:
    """The last ``n`` characters of each stream, from a line's start."""

    def last(text: str) -> str:
        return text if len(text) <= n else text[-n:].partition("\n")[2]

    return f"{last(proc.stdout)}\n{last(proc.stderr)}".strip()


def _results(folder: Path) -> dict:
    found = sorted(folder.glob("*/results.json"))
    if not found:
        raise CheckFailed(f"no results.json under {folder}")
    return json.loads(found[-1].read_text())


def run_deployment_mode(run: dict, args, work: Path, events: Path, env: dict, want: dict) -> dict:
    """deploy/start.sh --insecure with 4 SuperNodes, deploy/run.sh per variant, deploy/stop.sh."""
    from deploy.loopback import loopback_env

    deploy = work / "deploy"
    env = {**loopback_env(deploy, FLOWER_NODES), **env, "FEDPUREL_GPU_CHECK": str(events)}
    if shutil.which("ssh-keygen") is None:  # start.sh makes node keys; an insecure federation never reads them
        keys = deploy / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        for i in range(FLOWER_NODES):
            for name in (f"supernode-{i}", f"supernode-{i}.pub"):
                (keys / name).write_text("unused: insecure federation\n")
    out: dict = {}
    started = time.perf_counter()
    proc = _script(env, "bash", "deploy/start.sh", "--insecure", timeout=300)
    try:
        if proc.returncode != 0:
            raise CheckFailed(f"deploy/start.sh failed:\n{_tail(proc)}")
        out["start_s"] = round(time.perf_counter() - started, 1)
        for variant in args.flower_variants:
            folder = work / "deploy-out" / variant
            overrides = overrides_string({**run, "peft.name": variant, "train.min-nodes": FLOWER_NODES})
            start = time.perf_counter()
            proc = _script({**env, "OUTPUT_DIR": str(folder)}, "bash", "deploy/run.sh", overrides)
            wall = round(time.perf_counter() - start, 1)
            if proc.returncode != 0:
                logs = "\n".join(
                    f"--- {p.name}: {p.read_text()[-800:]}" for p in sorted((deploy / "logs").glob("supernode-*.log"))
                )
                out[variant] = {"ok": False, "problems": [f"deploy/run.sh failed:\n{_tail(proc)}\n{logs}"]}
                continue
            out[variant] = flower_run_report(folder, events, variant, want, wall)
    finally:
        _script(env, "bash", "deploy/stop.sh", timeout=120)
    return out


def flower_run_report(folder: Path, events: Path, variant: str, want: dict, wall: float) -> dict:
    """One Flower-mode run's entry of the report: its results.json and every process's observed device."""
    results = _results(folder)
    problems = check_results(results, want)
    event_problems, summary = check_events(read_events(events), variant, FLOWER_NODES, want)
    return {
        "ok": not (problems or event_problems),
        "problems": problems + event_problems,
        "wall_s": wall,
        "rounds": round_seconds(results),
        **summary,
    }


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_simulation_mode(run: dict, args, work: Path, events: Path, env: dict, want: dict, cuda: bool) -> dict:
    """scripts/run.sh (Ray) with 4 SuperNodes, CLIENT_GPUS=0.25 on a GPU, per variant."""
    gpus = "0.25" if cuda else "0.0"  # Ray cannot place a GPU fraction on a machine without a GPU
    out: dict = {"client_gpus": gpus}
    for variant in args.flower_variants:
        folder = work / "sim-out" / variant
        overrides = overrides_string({**run, "peft.name": variant, "train.min-nodes": FLOWER_NODES})
        sim_env = {
            **os.environ,
            **env,
            "FEDPUREL_GPU_CHECK": str(events),
            "NUM_SUPERNODES": str(FLOWER_NODES),
            "CLIENT_GPUS": gpus,
            "OUTPUT_DIR": str(folder),
            "FLWR_HOME": str(work / "flwr-sim"),
        }
        problems: list[str] = []
        for attempt in range(3):
            deadline = time.monotonic() + args.port_wait
            while _port_busy(SIMULATION_PORT) and time.monotonic() < deadline:
                time.sleep(5)  # another simulation holds the local SuperLink: wait for it
            if _port_busy(SIMULATION_PORT):
                problems = [f"the local SuperLink port {SIMULATION_PORT} stayed busy for {args.port_wait} s"]
                break
            start = time.perf_counter()
            proc = _script(sim_env, "bash", "scripts/run.sh", overrides)
            wall = round(time.perf_counter() - start, 1)
            if proc.returncode == 0:
                problems = []
                break
            problems = [f"scripts/run.sh failed (attempt {attempt + 1}):\n{_tail(proc)}"]
            if not _port_busy(SIMULATION_PORT):
                break  # not a collision with someone else's SuperLink: do not retry
        if problems:
            out[variant] = {"ok": False, "problems": problems}
            continue
        out[variant] = flower_run_report(folder, events, variant, want, wall)
    return out


# --- report ---------------------------------------------------------------------------------------------


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    lines = [
        f"{'mode':<11} {'variant':<8} {'ok':<4} {'ran on':<18} {'wall s':>7} {'rounds s (S1.., personal)':<26} "
        f"{'procs':>5} {'peak client MiB':>15} {'peak server MiB':>15}"
    ]
    for mode in MODES:
        runs = report["modes"].get(mode)
        if not isinstance(runs, dict):
            continue
        if "skipped" in runs:
            lines.append(f"{mode:<11} skipped: {runs['skipped']}")
            continue
        if "failed" in runs:
            lines.append(f"{mode:<11} FAILED: {runs['failed'].splitlines()[0]}")
            continue
        for variant in VARIANTS:
            r = runs.get(variant)
            if r is None:
                continue
            rounds = ", ".join(f"{x['seconds']:.1f}" for x in r.get("rounds", []))
            peak_client = r.get("peak_client_mib") or r.get("peak_process_mib")
            lines.append(
                f"{mode:<11} {variant:<8} {'yes' if r['ok'] else 'NO':<4} {', '.join(r.get('observed', [])):<18} "
                f"{_fmt(r.get('wall_s'), '7.1f'):>7} "
                f"{rounds:<26} {_fmt(r.get('client_processes'), 'd'):>5} {_fmt(peak_client):>15} "
                f"{_fmt(r.get('peak_server_mib')):>15}"
            )
    b = report.get("bench")
    if b:
        f = b["features"]
        lines.append(
            f"feature extraction: {f['images_per_s']:.1f} images/s over {f['images']} test images "
            f"(preprocessing alone {f['preprocess_only_images_per_s']:.1f} images/s)"
        )
        lines.append(
            f"{'Stage-1 step':<22} {'classes':>7} {'plain ms':>9} {'purified ms':>12} {'ratio':>6} "
            f"{'peak MiB':>9} {'above resident':>14}"
        )
        rows = [(v, r) for v, r in b["variants"].items()] + [("prompt, ImageNet-LT", b["imagenet_lt_prompt"])]
        for name, r in rows:
            m = r["memory"]["purified"]
            lines.append(
                f"{name:<22} {r['classes']:>7} {r['plain_ms']:>9.2f} {r['purified_ms']:>12.2f} {r['ratio']:>6.2f} "
                f"{_fmt(m['peak_mib']):>9} {_fmt(m['above_resident_mib']):>14}"
            )
        i = b["imagenet_lt_prompt"]
        at_once = _fmt(i["text_no_grad_unchunked"]["above_resident_mib"])
        chunked = _fmt(i["text_no_grad_chunked"]["above_resident_mib"])
        lines.append(
            f"1,000-class text pass without gradient: peak above resident {at_once} MiB at once, "
            f"{chunked} MiB in chunks of 256"
        )
        for r in b["reference_prompt_step"]:
            lines.append(
                f"reference-way prompt step (image encoder, full context, two backward), {r['classes']} classes: "
                f"{r['ms']:.2f} ms, peak above resident {_fmt(r['memory']['above_resident_mib'])} MiB"
            )
    verdict = "PASSED" if report["ok"] else "FAILED"
    lines.append(f"gpu_check {verdict} in {report['wall_s']:.0f} s; report: {report['report']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="inprocess,deployment,simulation", help=f"of {','.join(MODES)}")
    parser.add_argument(
        "--variants",
        default="",
        help="of prompt,adapter,lora (default: all; --quick: prompt; Flower modes on the CPU: prompt)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 Stage-1 round, the prompt only, 1 repeat, less data on the CPU"
    )
    parser.add_argument("--clients", type=int, default=0, help=f"in-process clients (0: {INPROCESS_CLIENTS}, 4 quick)")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (TOML value), repeatable")
    parser.add_argument("--no-bench", action="store_true", help="skip the step-time and memory measurements")
    parser.add_argument("--cpu", action="store_true", help="the CPU path even where CUDA is present")
    parser.add_argument("--data", choices=("embedded", "cifar"), default=None, help="default: cifar on a GPU")
    parser.add_argument("--train-per-class", type=int, default=100, help="fabricated CIFAR pool per class (= n-max)")
    parser.add_argument("--test-per-class", type=int, default=20, help="fabricated CIFAR test images per class")
    parser.add_argument("--repeats", type=int, default=0, help="timed steps per measurement (0: 20 GPU, 5 CPU)")
    parser.add_argument("--port-wait", type=int, default=600, help="seconds to wait for port 39091 (simulation)")
    parser.add_argument("--work", default="", help="work folder (default: a temporary one, removed)")
    parser.add_argument("--report", default="", help="the JSON report (default: outputs/gpu-check-<time>.json)")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}: choose from {', '.join(MODES)}")
    explicit = bool(args.variants)
    args.variants = [v for v in args.variants.split(",") if v] or (["prompt"] if args.quick else list(VARIANTS))
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}")
    if args.quick and not args.repeats:
        args.repeats = 1
    args.clients = args.clients or (4 if args.quick else INPROCESS_CLIENTS)

    flower_bin_on_path()
    if problem := check_imports(args.modes):
        print(problem, file=sys.stderr)
        return 2
    import torch
    from common import parse_sets

    args.set = parse_sets(args.set)  # after the import check: the config needs pydantic

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:  # one thread, as each ClientApp process and Ray actor: tiny ops on two threads wait on each other
        torch.set_num_threads(1)
    args.data = args.data or ("cifar" if cuda else "embedded")
    if cuda:
        machine = (
            f"CUDA on {torch.cuda.get_device_name(0)} ({_mib(torch.cuda.get_device_properties(0).total_memory):.0f} "
            f"MiB), torch {torch.__version__} (CUDA {torch.version.cuda}), "
            "CLIP ViT-B/16 at real size (random weights), fabricated CIFAR-100-LT"
        )
    else:
        why = "--cpu" if torch.cuda.is_available() else "no CUDA device"
        data = "fabricated CIFAR-100-LT, random weights" if args.data == "cifar" else "embedded data"
        machine = f"CPU ({why}): the same path with the tiny model (fedpurel-tiny, {data}), torch {torch.__version__}"
    print(f"gpu_check: {machine}", flush=True)
    # The variants differ in their computations, which the in-process runs check; what the Flower modes add
    # (processes, placement, the probe in each) is the same for all: on the CPU they run the prompt alone.
    args.flower_variants = args.variants if explicit or cuda else ["prompt"]
    if set(args.modes) & {"deployment", "simulation"} and args.flower_variants != args.variants:
        print("gpu_check: CPU: the deployment and the simulation run the prompt only (--variants for more)", flush=True)
    if "simulation" in args.modes and importlib.util.find_spec("ray") is None:
        print("gpu_check: Ray is not installed: the Flower simulation is skipped", flush=True)

    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="fedpurel-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    probe_dir = work / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "fedpurel_gpu_probe.py").write_text(PROBE)
    (probe_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    sys.path.insert(0, str(probe_dir))
    import fedpurel_gpu_probe

    fedpurel_gpu_probe.install()  # this process: the in-process loop, the fabricated CIFAR's MD5
    fedpurel_command(work / "bin")
    pythonpath = os.pathsep.join(p for p in (str(probe_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath, "PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1"}

    from common import run_cfg

    run = base_config(args, work, cuda)

    def cfg_of(variant: str):
        return run_cfg({**run, "peft.name": variant})

    want = intended(cuda, str(run.get("model.precision", "auto")))
    report: dict = {
        "machine": machine,
        "cuda": cuda,
        "intended": want,
        "torch_threads": torch.get_num_threads(),
        "config": run,
        "variants": args.variants,
        "flower_variants": args.flower_variants,
        "modes": {},
        "sections_s": {},
        "problems": [],
    }
    try:
        if not args.no_bench:
            print("gpu_check: measuring steps, features and memory ...", flush=True)
            report["bench"] = bench(cfg_of, args, cuda)
            report["sections_s"]["bench"] = round(sum(report["bench"]["seconds"].values()), 1)
        for mode in args.modes:
            section = time.perf_counter()
            events = work / f"events-{mode}.jsonl"
            variants = args.variants if mode == "inprocess" else args.flower_variants
            print(f"gpu_check: {mode} ({', '.join(variants)}) ...", flush=True)
            try:
                if mode == "inprocess":
                    report["modes"][mode] = run_inprocess_mode(cfg_of, args, events, want, cuda)
                elif mode == "deployment":
                    report["modes"][mode] = run_deployment_mode(run, args, work, events, env, want)
                elif importlib.util.find_spec("ray") is None:
                    report["modes"][mode] = {"skipped": "Ray is not installed"}
                else:
                    report["modes"][mode] = run_simulation_mode(run, args, work, events, env, want, cuda)
            except (CheckFailed, subprocess.TimeoutExpired) as err:
                report["modes"][mode] = {"failed": str(err)}
                report["problems"].append(f"{mode}: {err}")
            report["sections_s"][mode] = round(time.perf_counter() - section, 1)
            for variant, r in report["modes"][mode].items():
                if isinstance(r, dict) and r.get("problems"):
                    report["problems"] += [f"{mode} {variant}: {p}" for p in r["problems"]]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["ok"] = not report["problems"]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    path = Path(args.report or ROOT / "outputs" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report["report"] = str(path)
    path.write_text(json.dumps(report, indent=2))
    print(table(report), flush=True)
    if report["problems"]:
        print("GPU CHECK FAILED:", file=sys.stderr)
        for problem in report["problems"][:40]:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
