"""Python side of a loopback federation started by deploy/start.sh (used by the tests and bench/).

The deploy scripts read their settings from the environment (deploy/common.sh);
:func:`loopback_env` gives one that runs a federation in its own folder on free
ports, so it can run beside other Flower processes on the same machine.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What a ClientApp message does in a fresh process before any work: import the app, build the model.
_START = (
    "import time; t0 = time.perf_counter()\n"
    "import client_app.app\n"
    "t1 = time.perf_counter()\n"
    "from fedpurel_app.config import parse_run_config\n"
    "from fedpurel_app.data.client import classes\n"
    "from fedpurel_app.inputs import clip_of\n"
    "from fedpurel_app.peft.base import build_peft\n"
    "cfg = parse_run_config({})\n"
    "classnames, template = classes(cfg.data)\n"
    "peft = build_peft(cfg, clip_of(cfg.model, cfg.data), classnames, template)\n"
    "t2 = time.perf_counter()\n"
    "import torch\n"
    "torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.1)\n"
    "print(t1 - t0, t2 - t1, time.perf_counter() - t2)\n"
)


def free_port_base(count: int) -> int:
    """A base port such that base .. base + count - 1 are all free on 127.0.0.1."""
    for _ in range(200):
        base = random.randint(41000, 59000)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free range of ports on 127.0.0.1")


def loopback_env(deploy_dir: Path, nodes: int) -> dict[str, str]:
    """The environment of deploy/{start,run,stop}.sh for ``nodes`` SuperNodes in ``deploy_dir``.

    Ports are free ones; the SuperNodes' ClientApp processes share the machine's
    cores, so each runs torch on one thread.
    """
    base = free_port_base(nodes + 3)
    env = {
        **os.environ,
        "DEPLOY_DIR": str(deploy_dir),
        "SUPERLINK_PORT": str(base),
        "SUPERNODE_PORT_BASE": str(base + 1),
        "NUM_SUPERNODES": str(nodes),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "STARTUP_TIMEOUT": "150",
    }
    env.pop("FLWR_HOME", None)  # deploy/common.sh sets it inside deploy_dir
    return env


def message_start_cost() -> tuple[float, float, float, float]:
    """(imports, model build, first optimizer, wall) seconds of a fresh process doing what every
    ClientApp message does in deployment before it trains: import the app (torch, flwr), build
    the default model and create its first ``torch.optim`` optimizer (whose first
    ``add_param_group`` imports ``torch._dynamo``: the one-time cost of a training message).

    Raises RuntimeError with the process's error output when it fails.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _START], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the ClientApp import failed:\n{proc.stderr[-3000:]}")
    imports, build, optimizer = map(float, proc.stdout.split()[-3:])
    return imports, build, optimizer, wall
