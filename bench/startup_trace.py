"""Timeline of a Flower simulation run: when each process starts, what it imports, when it ends.

Runs ``bash scripts/run.sh [overrides]`` with a ``sitecustomize`` module on
``PYTHONPATH``, so that every Python process of the run (the ``flwr`` CLI, the
SuperLink, its SuperExec, the simulation process, Ray's processes and actors)
appends to one event file: its start and exit, the end of its imports of flwr,
torch, open_clip, the ServerApp and the ClientApp, and its loading of the CLIP
(``fedpurel_app.inputs.frozen_clip``; open_clip's import included when it comes
first). Then prints the events in time order, from the command's start.

    python bench/startup_trace.py ["key=value overrides"] [--clients 20] [--all] [--deployment NODES]

``--all`` prints Ray's helper processes' events too.
``--deployment NODES`` traces a loopback deployment instead (``deploy/start.sh``
with NODES SuperNodes, ``deploy/run.sh``, ``deploy/stop.sh``, as
``bench/deployment.py`` runs them): every ClientApp message is a process of
its own there.
What it adds to each process is a few file appends. A ``sitecustomize`` of the
environment's own is shadowed during the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from deployment import deployment_run  # noqa: E402
from framework_overhead import flower_run  # noqa: E402

WATCHED = ("flwr", "torch", "open_clip", "server_app.app", "client_app.app")

# Written into a temporary folder as sitecustomize.py; reads its event file from FEDPUREL_TRACE.
SITECUSTOMIZE = '''
import importlib.abc, os, sys, time

_FILE = os.environ.get("FEDPUREL_TRACE")
_WATCHED = set(__WATCHED__)


def _event(what):
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    with open(_FILE, "a") as f:
        f.write(f"{time.time():.3f}\\t{os.getpid()}\\t{name}\\t{what}\\n")


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of each watched module, to record when its first import ends."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED and fullname != "fedpurel_app.inputs":
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            start = time.time()
            run(module)
            if fullname == "fedpurel_app.inputs":
                load = module.frozen_clip

                def frozen_clip(*args, **kwargs):
                    t = time.time()
                    clip = load(*args, **kwargs)
                    if time.time() - t > 0.01:  # the first call loads; later ones return the cached model
                        _event(f"loaded the CLIP ({time.time() - t:.2f} s)")
                    return clip

                module.frozen_clip = frozen_clip
            elif fullname in _WATCHED:
                _WATCHED.discard(fullname)
                _event(f"imported {fullname} ({time.time() - start:.2f} s)")

        spec.loader.exec_module = exec_module
        return spec


if _FILE:
    _event("start")
    sys.meta_path.insert(0, _Finder())
    import atexit

    atexit.register(_event, "exit")
'''.replace("__WATCHED__", repr(WATCHED))

RAY_HELPERS = ("monitor.py", "dashboard.py", "log_monitor.py", "agent.py", "main.py", "setup_worker.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="?", default="", help="run-config overrides")
    parser.add_argument("--all", action="store_true", help="also Ray's helper processes' events")
    parser.add_argument("--clients", type=int, default=20, help="SuperNodes of the simulation (NUM_SUPERNODES)")
    parser.add_argument("--deployment", type=int, metavar="NODES", help="trace a loopback deployment instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        events = Path(tmp) / "events.tsv"
        path = os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH", "")) if p)
        os.environ.update(PYTHONPATH=path, FEDPUREL_TRACE=str(events))
        start = time.time()
        if args.deployment:
            overrides = f"{args.overrides} train.min-nodes={args.deployment}".strip()
            what = f"loopback deployment of {args.deployment} SuperNodes, {overrides!r}"
            deployment_run(overrides, args.deployment, Path(tmp) / "deploy")
        else:
            what = f"scripts/run.sh {args.overrides!r}, {args.clients} SuperNodes"
            flower_run(args.overrides, args.clients, Path(tmp) / "outputs")
        end = time.time()
        lines = [line.split("\t") for line in events.read_text().splitlines()] if events.exists() else []
    print(f"{what}: {end - start:.1f} s; nproc {os.cpu_count()}")
    for stamp, pid, name, event in sorted(lines, key=lambda row: float(row[0])):
        if not args.all and name in RAY_HELPERS and event != "start":
            continue
        print(f"{float(stamp) - start:7.2f}  {name[:22]:22} {pid:>7}  {event}")
    print(f"{end - start:7.2f}  the end")


if __name__ == "__main__":
    sys.exit(main())
