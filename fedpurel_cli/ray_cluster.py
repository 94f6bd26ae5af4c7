"""``python -m fedpurel_cli.ray_cluster [presets and key=value strings]``: the check that
``scripts/run.sh`` runs before a simulation attaches to an existing Ray cluster (``RAY_ADDRESS``).

Flower's simulation has no address of its own: the SuperLink that ``flwr run`` starts passes
``RAY_ADDRESS`` on to the simulation, whose ``ray.init()`` then joins that cluster instead of
starting one. Every ClientApp runs in a Ray actor on some machine of the cluster, with that
machine's Python: the app, its dependencies and the data must be there too. This check says
before the run what the simulation will find:

- one line for the cluster (nodes, CPUs, GPUs, how many ClientApp actors fit, by Flower's own
  rule) and one line per node;
- on every node, with the Python path a ClientApp actor gets there: whether the app's modules
  are found, whether the run's dataset is there, whether the app's files are the same as here,
  and whether the node's cache holds the same embedded CLIP checkpoints as this machine's.

Exit status 0: go (notes may be printed); 1: some node cannot run the app (one line per
problem); 2: the cluster cannot be reached, or bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from . import overrides as _overrides

README = "README: Simulation on a Ray cluster"
HINT = f"install the same .venv and app on every machine of the cluster ({README})"

# What a ClientApp imports (the app's packages and the dependencies they import on a client).
CLIENT_MODULES = (
    "flwr",
    "torch",
    "torchvision",
    "open_clip",
    "peft",
    "pydantic",
    "numpy",
    "safetensors",
    "fedpurel_app",
    "client_app",
)
# The app's own packages: their files must be the same on every node.
APP_PACKAGES = ("fedpurel_app", "client_app")
# The embedded datasets and the library functions that find their files (in installed packages).
EMBEDDED_DATA = {
    "mnist": ("mnist_file",),
    "mnist-animals": ("mnist_file", "animal_mnist_files"),
    "mnist-animals-blur": ("mnist_file", "animal_mnist_files"),
}
PROBE_TIMEOUT_S = 120.0


# --- run on every node (pickled by value: nothing here needs this module on the node) ------------


def package_fingerprint(packages: Sequence[str] = APP_PACKAGES) -> str:
    """SHA-256 over the ``.py`` files (relative paths and bytes) of ``packages`` as this Python
    finds them; '' when one is not found."""
    import importlib.util

    digest = hashlib.sha256()
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return ""
        root = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def checkpoints(cache_dir: str) -> dict[str, str]:
    """The embedded CLIP checkpoints in ``cache_dir`` ('' = $FEDPUREL_CACHE or ~/.cache/fedpurel):
    file name -> SHA-256."""
    env = os.environ.get("FEDPUREL_CACHE")
    folder = Path(cache_dir or env or "~/.cache/fedpurel").expanduser()
    found = {}
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        found[path.name] = digest.hexdigest()
    return found


def probe(modules: Sequence[str], data_name: str, data_root: str, cache_dir: str) -> dict:
    """What this node's Python finds: missing modules, the dataset, the app's fingerprint."""
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    data = ""
    if data_name in EMBEDDED_DATA and "fedpurel_app" not in missing and "numpy" not in missing:
        try:
            from fedpurel_app.data import embedded

            for locate in EMBEDDED_DATA[data_name]:
                getattr(embedded, locate)()
        except Exception as err:  # noqa: BLE001 - reported, with its own message
            data = str(err)
    elif data_root and not Path(data_root).expanduser().is_dir():
        data = f"data.root {data_root} is not a folder on this machine"
    return {
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "missing": missing,
        "data": data,
        "app": package_fingerprint(),
        "checkpoints": checkpoints(cache_dir),
    }


# --- on this machine -------------------------------------------------------------------------


def actors_that_fit(nodes: Sequence[dict], num_cpus: float, num_gpus: float) -> int:
    """Flower's own count of the ClientApp actors that fit (``pool_size_from_resources``): per
    node, CPUs // client CPUs, and at most GPUs // client GPUs when clients ask for GPUs."""
    total = 0
    for node in nodes:
        resources = node.get("Resources") or {}
        fit = int(resources.get("CPU", 0) / num_cpus)
        if num_gpus > 0:
            gpus = resources.get("GPU", 0)
            fit = min(fit, int(gpus / num_gpus)) if gpus else 0
        total += fit
    return total


def problems_of(node: str, report: dict, here: dict, data_name: str) -> tuple[list[str], list[str]]:
    """(problems, notes) of one node's probe report, against this machine's."""
    problems, notes = [], []
    if report["missing"]:
        names = ", ".join(report["missing"])
        problems.append(f"the Ray worker at {node} cannot import {names}: {HINT}")
    if report["data"]:
        problems.append(
            f"the Ray worker at {node} cannot find the dataset '{data_name}': {report['data']} "
            f"(every machine of the cluster needs the run's data; {README})"
        )
    if not report["missing"] and here["app"] and report["app"] != here["app"]:
        problems.append(
            f"the Ray worker at {node} has other app files than this machine (fedpurel_app, client_app): "
            f"check out the same commit on every machine of the cluster, or share one checkout ({README})"
        )
    if report["python"] != here["python"]:
        problems.append(
            f"the Ray worker at {node} runs Python {report['python']}, this machine {here['python']}: {HINT}"
        )
    mine, theirs = here["checkpoints"], report["checkpoints"]
    if mine and not set(mine) & set(theirs):
        notes.append(
            f"the Ray worker at {node} has none of this machine's embedded CLIP checkpoints in its cache: "
            "its clients pretrain their own on first use; copy this machine's cache folder there "
            "(or point FEDPUREL_CACHE at a shared folder) so that every client uses the same one"
        )
    differ = sorted(name for name in set(mine) & set(theirs) if mine[name] != theirs[name])
    if differ:
        notes.append(
            f"the Ray worker at {node} has another {differ[0]} in its cache than this machine: "
            "copy this machine's file there so that every client uses the same frozen CLIP"
        )
    return problems, notes


def _reachable(address: str, timeout: float = 3.0) -> str:
    """'' when a TCP connection to ``address`` (host:port) opens, else why not (ray.init itself
    would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"'{address}' is not host:port"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        return str(err) or type(err).__name__
    return ""


def _say(line: str, stream=sys.stdout) -> None:
    print(f"fedpurel: {line}", file=stream, flush=True)


def _config_values(argv: Sequence[str]) -> dict:
    import tomllib

    from fedpurel_app.config import flat_items

    root = Path(__file__).resolve().parent.parent
    defaults = dict(flat_items(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]))
    return {**defaults, **_overrides.merge(list(argv))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpurel_cli.ray_cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--client-cpus", type=float, default=1.0, help="client-resources-num-cpus of the run")
    parser.add_argument("--client-gpus", type=float, default=0.0, help="client-resources-num-gpus of the run")
    parser.add_argument("config", nargs="*", help="presets and key=value strings, as scripts/run.sh takes them")
    args = parser.parse_args(argv)
    address = os.environ.get("RAY_ADDRESS", "")
    if not address:
        _say("RAY_ADDRESS is not set: nothing to check (the simulation starts a local Ray instance)")
        return 0
    try:
        values = _config_values(args.config)
    except _overrides.OverrideError as err:
        _say(str(err), sys.stderr)
        return 2
    why = _reachable(address)
    if why:
        _say(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({why}): start it there with "
            "`ray start --head`, or unset RAY_ADDRESS for a simulation on this machine alone",
            sys.stderr,
        )
        return 2

    import ray
    import ray.cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The Python path of Flower's actors (its RayBackend sets the driver's sys.path on them).
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}}
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level="ERROR", log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - a version mismatch, a refused connection, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _say(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {first}", sys.stderr)
        return 2
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
        cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
        gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        fit = actors_that_fit(nodes, args.client_cpus, args.client_gpus)
        _say(
            f"attaching to the Ray cluster at {address}: {len(nodes)} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s); "
            f"{fit} ClientApp actor(s) fit ({args.client_cpus:g} CPU, {args.client_gpus:g} GPU each)"
        )
        here_id = ray.get_runtime_context().get_node_id()
        for n in sorted(nodes, key=lambda n: (n["NodeID"] != here_id, n["NodeManagerAddress"], n["NodeID"])):
            r = n["Resources"]
            mark = " (this machine's node)" if n["NodeID"] == here_id else ""
            _say(
                f"  node {n['NodeID'][:12]} {n['NodeManagerAddress']}: {r.get('CPU', 0):g} CPU(s), "
                f"{r.get('GPU', 0):g} GPU(s){mark}"
            )
        if fit == 0:
            _say(
                f"no ClientApp actor fits the cluster with {args.client_cpus:g} CPU and {args.client_gpus:g} GPU "
                "each: lower CLIENT_GPUS, or add nodes with GPUs",
                sys.stderr,
            )
            return 1

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        remote_probe = ray.remote(num_cpus=0)(probe)
        data_name, data_root, cache = values["data.name"], values["data.root"], values["model.cache-dir"]
        pending = {
            n["NodeID"]: remote_probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(CLIENT_MODULES, data_name, data_root, cache)
            for n in nodes
        }
        here = probe(CLIENT_MODULES, data_name, data_root, cache)
        problems, notes = [], []
        for n in nodes:
            where = f"{n['NodeManagerAddress']} (node {n['NodeID'][:12]})"
            try:
                report = ray.get(pending[n["NodeID"]], timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                problems.append(f"the Ray worker at {where} did not answer within {PROBE_TIMEOUT_S:g} s")
                continue
            except Exception as err:  # noqa: BLE001 - the node's Python could not run the check
                lines = [line for line in str(err).strip().splitlines() if line.strip()]
                problems.append(f"the Ray worker at {where} cannot run Python tasks: {lines[-1] if lines else err}")
                continue
            p, q = problems_of(where, report, here, data_name)
            problems += p
            notes += q
    finally:
        ray.shutdown()
    for line in notes:
        _say(f"note: {line}")
    for line in problems:
        _say(line, sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
