"""Per-message cost against Flower's floor: a bare ClientApp and ours, side by side on one federation.

Flower has no long-lived ClientApp process: on a deployed SuperNode every
message runs in a fresh ``flwr-clientapp`` process (flwrlabs/flower#3670).
This bench measures what one message costs a node for two apps on the same
loopback federation (``deploy/start.sh``: one SuperLink and ``--nodes``
SuperNodes on 127.0.0.1, insecure unless ``--tls``), in one run:

- **bare** (``bench/bare_app``): a numpy-only ClientApp that returns the
  received ArrayRecord + 1 (1 KiB, the size of the embedded default's phi_g);
  its ServerApp sends ``--rounds`` rounds of train messages to every node.
  Everything it costs is Flower's: the floor of a message. It runs before and
  after ours, so that its figures bracket ours when the machine's load drifts.
- **ours** (``deploy/run.sh``): the embedded default with ``--rounds`` Stage-1
  rounds on every node (``train.fraction=1``), no personalization, PM evaluated
  at the start and the end only: per node one evaluate message, ``--rounds``
  train messages, one evaluate message.

**Method.** The probe of ``bench/startup_trace.py`` (a ``sitecustomize`` on
``PYTHONPATH``: every Python process of the federation appends its events to
one file) with more hooks:

- in each SuperNode, its log lines "Receiving: <type> message", "Sending:
  ..." and "Sent successfully": a message's cost to the node is from
  "Receiving" (the message pulled from the SuperLink) to "Sent" (the reply
  pushed to it), the same clock for both apps;
- in each SuperExec, its launch of a ClientApp process;
- in each ClientApp process: its start, ``run_clientapp``'s start, the pull of
  the message and context, the FAB install, the app's import, the handler,
  the push of the reply and its exit; inside our handler the CLIP load, the
  client's data, its features, the PEFT build and the training, and the
  imports of torch, open_clip and ``torch._dynamo``. Every span has its wall
  time and the process's CPU time (``time.process_time``), exclusive: a
  nested span is counted once, in its own row. The rows of a message add up
  to its wall time on the node and to its ClientApp process's CPU time.

On a loaded machine the wall times grow with the load; the CPU times much
less: they are the better estimate of what an idle node would spend.

A run's first message on a node also fetches and installs the FAB (and, for
ours, computes the client's features): those are shown apart, and the
per-message figures are the medians over the other train messages. The
ServerApp's round time (push to last reply) is shown too: it adds the node's
idle wait for a message (a SuperNode without work pulls every 3 s).

Unless ``--no-warm``, the bench then times one Stage-1 training message
(``Client.train``) of each of the embedded default's 20 clients in its own
warm process: what a message would still cost with a warm per-node worker
holding the model, data and features. ``--real-size MODEL`` (e.g. ViT-B-16,
random initial weights, see ``bench/real_size.py``) times ``--starts`` fresh
processes importing the app and building that model, and as many building the
embedded one: the start a warm worker would save at that size
(``--starts-only``: only that).

    python bench/message_cost.py [--nodes 1] [--rounds 4] [--tls] [--set key=value ...] [--no-warm]
    python bench/message_cost.py --starts-only --real-size ViT-B-16 [--starts 2]

Python writes bytecode in the federation's processes (its default, also where
the environment sets ``PYTHONDONTWRITEBYTECODE``): a node imports the
installed FAB's modules from their cached bytecode after its first message.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from deploy.loopback import loopback_env  # noqa: E402

BARE_APP = ROOT / "bench" / "bare_app"

# Hooks added to startup_trace's probe (same module: _event, _FILE). Each wraps a function of a
# module right after the module runs, before any importer binds its names.
HOOKS = r"""

def _span(name, fn):
    def wrapped(*args, **kwargs):
        start, cpu = time.time(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _event(f"{name} (wall {time.time() - start:.4f} s, cpu {time.process_time() - cpu:.4f} s)")
    return wrapped


def _hook_node(module):
    log = module.log
    marks = {"Receiving: %s message (ID: %s)": "node receiving", "Sending: %s message (ID: %s)": "node sending",
             "Sent successfully": "node sent"}

    def logged(level, msg, *args, **kwargs):
        mark = marks.get(msg) if isinstance(msg, str) else None
        if mark:
            _event(f"{mark} {args[0]}" if args else mark)
        return log(level, msg, *args, **kwargs)

    module.log = logged


def _hook_executor(module):
    launch = module.SubprocessExecutor.launch

    def launched(self, spec):
        _event("launch")
        return launch(self, spec)

    module.SubprocessExecutor.launch = launched


def _hook_clientapp_process(module):
    run = module.run_clientapp

    def entered(*args, **kwargs):
        _event(f"enter run_clientapp (cpu {time.process_time():.4f} s)")
        return run(*args, **kwargs)

    module.run_clientapp = entered
    module.pull_task_input = _span("pull", module.pull_task_input)
    module.install_from_fab = _span("fab install", module.install_from_fab)
    module.push_message = _span("push", module.push_message)
    get_loader = module.get_load_client_app_fn
    module.get_load_client_app_fn = lambda *a, **k: _span("app import", get_loader(*a, **k))


def _hook_clientapp(module):
    module.ClientApp.__call__ = _span("handler", module.ClientApp.__call__)


def _hook_inputs(module):
    module.frozen_clip = _span("clip load", module.frozen_clip)


def _hook_client(module):
    module.client_data = _span("client data", module.client_data)
    for name, label in (("_feature_sets", "features"), ("model", "peft build"), ("train", "training"),
                        ("personalize", "training"), ("evaluate", "evaluation")):
        setattr(module.Client, name, _span(label, getattr(module.Client, name)))


_HOOKS = {
    "flwr.supernode.start_client_internal": _hook_node,
    "flwr.supercore.superexec.executor.subprocess_executor": _hook_executor,
    "flwr.supernode.runtime.run_clientapp": _hook_clientapp_process,
    "flwr.clientapp.client_app": _hook_clientapp,
    "fedpurel_app.inputs": _hook_inputs,
    "fedpurel_app.client": _hook_client,
    "torch": None,  # None: time the import only
    "torch._dynamo": None,
    "open_clip": None,
    "client_app.app": None,
}


class _Hooks(importlib.abc.MetaPathFinder):
    _finding = set()  # startup_trace's finder asks the others too, this one included

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS or fullname in self._finding:
            return None
        spec = None
        self._finding.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        run, hook = spec.loader.exec_module, _HOOKS.pop(fullname)

        def exec_module(module):
            if hook is None:
                _span(f"import {fullname}", run)(module)
            else:
                run(module)
                hook(module)

        spec.loader.exec_module = exec_module
        return spec


if _FILE:
    _event(f"ppid {os.getppid()}")
    _event(f"cpu at start {time.process_time():.4f} s")
    sys.meta_path.insert(0, _Hooks())
    atexit.register(lambda: _event(f"cpu at exit {time.process_time():.4f} s"))
"""


def probe() -> str:
    """The sitecustomize module: startup_trace's probe and the hooks above."""
    from startup_trace import SITECUSTOMIZE  # imports the benches it runs: not needed for --help

    return SITECUSTOMIZE + HOOKS


# The ClientApp process's spans after run_clientapp's start, by row (names as the probe writes them).
PROCESS_ROWS = {
    "pull the message and context from the SuperNode": ("pull",),
    "FAB install (the run's first message)": ("fab install",),
    "app import (torch, the library)": ("app import", "import client_app.app", "import torch"),
    "open_clip and torch._dynamo imports": ("import open_clip", "import torch._dynamo"),
    "model build (CLIP load, PEFT build)": ("clip load", "peft build"),
    "client data (Fed-LT split)": ("client data",),
    "features": ("features",),
    "training / evaluation": ("training", "evaluation"),
    "handler, the rest": ("handler",),
    "push the reply to the SuperNode": ("push",),
}
IMPORT_ROWS = ("app import (torch, the library)", "open_clip and torch._dynamo imports")
HELD_ROWS = IMPORT_ROWS + ("model build (CLIP load, PEFT build)", "client data (Fed-LT split)", "features")
SPAN = re.compile(r"^(?P<name>.+) \(wall (?P<wall>[0-9.]+) s, cpu (?P<cpu>[0-9.]+) s\)$")
CPU = re.compile(r"^(?P<what>cpu at start|cpu at exit|enter run_clientapp) \(?(cpu )?(?P<cpu>[0-9.]+) s\)?$")
TOLERANCE = 0.01  # seconds: the probe writes times to 1 ms


@dataclass
class Span:
    name: str
    start: float
    end: float
    cpu: float


@dataclass
class Process:
    pid: str
    name: str
    ppid: str = ""
    start: float | None = None
    enter: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # process_time at start, enter, exit
    spans: list[Span] = field(default_factory=list)


@dataclass
class NodeMessage:
    node: str  # the SuperNode's pid
    kind: str
    receiving: float
    sending: float | None = None
    sent: float | None = None
    launch: float | None = None
    process: Process | None = None
    first: bool = False  # the run's first message on this node (FAB fetch and install)

    @property
    def total(self) -> float:
        return (self.sent or self.receiving) - self.receiving


def read_events(path: Path) -> list[tuple[float, str, str, str]]:
    """(time, pid, process name, what) of the probe's event file, in time order."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split("\t")
        if len(parts) == 4:
            rows.append((float(parts[0]), parts[1], parts[2], parts[3]))
    return sorted(rows)


def exclusive(spans: list[Span]) -> list[tuple[str, float, float]]:
    """(name, wall seconds, CPU seconds) of each span less the spans nested in it, so that each
    second is counted once, in the innermost span holding it. Spans nest or are disjoint, as
    calls do; their ends may be off by ``TOLERANCE``. Of two spans over the same interval the
    later one (it ended first: the inner call) is nested in the other."""

    def inside(j: int, i: int) -> bool:  # span j nested in span i
        a, b = spans[i], spans[j]
        if j == i or b.start < a.start - TOLERANCE or b.end > a.end + TOLERANCE:
            return False
        d_a, d_b = a.end - a.start, b.end - b.start
        return d_b < d_a - TOLERANCE or (abs(d_b - d_a) <= TOLERANCE and j < i)

    out = []
    for i, span in enumerate(spans):
        nested = [j for j in range(len(spans)) if inside(j, i)]
        direct = [j for j in nested if not any(inside(j, k) for k in nested)]
        wall = (span.end - span.start) - sum(spans[j].end - spans[j].start for j in direct)
        out.append((span.name, wall, span.cpu - sum(spans[j].cpu for j in direct)))
    return out


def parse(events: list[tuple[float, str, str, str]]) -> list[NodeMessage]:
    """The SuperNodes' messages, each with its SuperExec launch and its ClientApp process."""
    procs: dict[str, Process] = {}
    messages: list[NodeMessage] = []
    open_message: dict[str, NodeMessage] = {}
    launches: dict[str, list[float]] = defaultdict(list)  # SuperExec pid -> launch times
    for t, pid, name, what in events:
        proc = procs.setdefault(pid, Process(pid, name))
        if what == "start":
            proc.start = t
        elif what.startswith("ppid "):
            proc.ppid = what.split()[1]
        elif what == "launch":
            launches[pid].append(t)
        elif what.startswith("node "):
            mark, _, kind = what.removeprefix("node ").partition(" ")
            if mark == "receiving":
                open_message[pid] = NodeMessage(pid, kind, t)
                messages.append(open_message[pid])
            elif pid in open_message:
                setattr(open_message[pid], mark, t)
                if mark == "sent":
                    del open_message[pid]
        elif m := SPAN.match(what):
            wall = float(m["wall"])
            proc.spans.append(Span(m["name"], t - wall, t, float(m["cpu"])))
        elif m := CPU.match(what):
            proc.cpu[m["what"]] = float(m["cpu"])
            if m["what"] == "enter run_clientapp":
                proc.enter = t
    apps = [p for p in procs.values() if p.name == "flwr-clientapp" and p.start is not None]
    for msg in messages:
        end = msg.sent if msg.sent is not None else float("inf")
        execs = {pid for pid, p in procs.items() if p.ppid == msg.node and p.name == "flower-superexec"}
        msg.launch = next((t for pid in execs for t in launches[pid] if msg.receiving <= t <= end), None)
        msg.process = next((p for p in apps if p.ppid in execs and msg.receiving <= p.start <= end), None)  # type: ignore[operator]
    return messages


def rows(msg: NodeMessage) -> dict[str, tuple[float, float | None]]:
    """A message's (wall, CPU) seconds by row, in time order; the walls add up to its total, the
    CPU seconds to its ClientApp process's (CPU None: not the ClientApp's). Empty when the probe
    missed one of its points."""
    p = msg.process
    if p is None or p.start is None or p.enter is None or msg.sending is None or msg.sent is None:
        return {}
    launch = msg.launch if msg.launch is not None else p.start
    push_end = max((s.end for s in p.spans if s.name == "push"), default=p.enter)
    after = [s for s in p.spans if s.start >= p.enter - TOLERANCE]
    wall: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    for name, w, c in exclusive(after):
        wall[name] += w
        cpu[name] += c
    inner = {label: (sum(wall[n] for n in names), sum(cpu[n] for n in names)) for label, names in PROCESS_ROWS.items()}
    cpu_start, cpu_enter = p.cpu.get("cpu at start", 0.0), p.cpu.get("enter run_clientapp", 0.0)
    cpu_exit = p.cpu.get("cpu at exit", cpu_enter)
    return {
        "node: message pulled -> SuperExec starts its process": (launch - msg.receiving, None),
        "process start (fork, exec, Python)": (p.start - launch, cpu_start),
        "Python and flwr imports (to run_clientapp)": (p.enter - p.start, cpu_enter - cpu_start),
        **inner,
        "ClientApp process, between those (and its exit: CPU)": (
            (push_end - p.enter) - sum(w for w, _ in inner.values()),
            cpu_exit - cpu_enter - sum(c for _, c in inner.values()),
        ),
        "node: reply picked up (polls every 0.5 s; may overlap the push)": (msg.sending - push_end, None),
        "node: reply pushed to the SuperLink": (msg.sent - msg.sending, None),
    }


def median_rows(messages: list[NodeMessage]) -> dict[str, tuple[float, float | None]]:
    """The median (wall, CPU) of each row over ``messages``."""
    per = [r for r in map(rows, messages) if r]
    if not per:
        return {}
    out = {}
    for key, (_, c) in per[0].items():
        w = statistics.median(r[key][0] for r in per)
        out[key] = (w, None if c is None else statistics.median(r[key][1] for r in per))  # type: ignore[misc]
    return out


def process_cpu(msg: NodeMessage) -> float:
    """CPU seconds of the message's ClientApp process, start to exit."""
    p = msg.process
    return p.cpu.get("cpu at exit", float("nan")) if p is not None else float("nan")


def in_window(messages: list[NodeMessage], window: tuple[float, float]) -> list[NodeMessage]:
    """The messages of one run (received within its window), each node's first one marked."""
    chosen = [m for m in messages if window[0] <= m.receiving <= window[1]]
    seen: set[str] = set()
    for m in chosen:
        m.first = m.node not in seen
        seen.add(m.node)
    return chosen


# --- the federation ------------------------------------------------------------------------------


def flwr_run(app: Path, config: str, env: dict[str, str]) -> tuple[str, str]:
    """``flwr run APP --stream`` on the federation; (its output, the run's final status)."""
    connection = env.get("CONNECTION", "fedpurel-deploy")
    proc = subprocess.run(
        ["flwr", "run", str(app), connection, "--stream", "--run-config", config],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    output = proc.stdout + proc.stderr
    found = re.findall(r"Successfully started run (\d+)", output)
    if not found:
        raise SystemExit(f"flwr run {app} did not start a run:\n{output[-3000:]}")
    status = ""
    for _ in range(30):  # the stream can end a moment before the status is final
        listed = subprocess.run(
            ["flwr", "ls", connection, "--run-id", found[-1], "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
        )
        try:
            status = json.loads(listed.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            status = ""
        if status.startswith("finished:"):
            break
        time.sleep(1)
    return output, status


def federation_env(work: Path, nodes: int, probe_dir: Path, events: Path) -> dict[str, str]:
    env = loopback_env(work / "deploy", nodes)
    path = os.pathsep.join(p for p in (str(probe_dir), env.get("PYTHONPATH", "")) if p)
    env.update(PYTHONPATH=path, FEDPUREL_TRACE=str(events), OUTPUT_DIR=str(work / "outputs"))
    env["FLWR_HOME"] = str(work / "deploy" / "flwr-home")  # deploy/common.sh's, for flwr run / ls here
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    venv_bin = ROOT / ".venv" / "bin"
    if venv_bin.is_dir():
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def both_runs(nodes: int, rounds: int, tls: bool, ours_config: str) -> dict:
    """Start the federation; run the bare app, ours, and the bare app again (the machine's load
    drifts: the bare runs bracket ours); stop it. The probe's events, each run's window and
    server-side round times."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        probe_dir, events = work / "probe", work / "events.tsv"
        probe_dir.mkdir()
        (probe_dir / "sitecustomize.py").write_text(probe())
        env = federation_env(work, nodes, probe_dir, events)

        def script(name: str, *args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["bash", str(ROOT / "deploy" / name), *args], cwd=ROOT, env=env, capture_output=True, text=True
            )

        out: dict = {"bare_windows": [], "bare_rounds": []}

        def bare_run() -> None:
            start = time.time()
            output, status = flwr_run(BARE_APP, f"rounds={rounds} min-nodes={nodes}", env)
            out["bare_windows"].append((start, time.time()))
            if status != "finished:completed":
                raise SystemExit(f"the bare app's run ended with status {status!r}:\n{output[-3000:]}")
            found = re.findall(r"\[bare\] round \d+: \d+ replies in ([0-9.]+) s", output)
            out["bare_rounds"] += [float(t) for t in found[1:]]  # round 1 fetches the FAB

        try:
            started = script("start.sh", *([] if tls else ["--insecure"]), str(nodes))
            if started.returncode != 0:
                raise SystemExit(f"deploy/start.sh failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
            bare_run()
            start = time.time()
            ours = script("run.sh", ours_config)
            out["ours_window"] = (start, time.time())
            if ours.returncode != 0:
                raise SystemExit(f"deploy/run.sh failed:\n{ours.stdout[-3000:]}\n{ours.stderr[-3000:]}")
            (results,) = sorted((work / "outputs").glob("*/results.json"))
            out["results"] = json.loads(results.read_text())
            bare_run()
        finally:
            script("stop.sh")
        out["events"] = read_events(events)
        return out


# --- warm compute and real-size start ------------------------------------------------------------


def warm_training(clients: int = 20) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of one Stage-1 message's training (``Client.train``) of each client of the embedded
    default, in this process once its model, data and features are loaded: what a warm worker
    would still spend per message."""
    import torch
    from common import node, run_cfg

    from fedpurel_app.client import Client, DictMemory
    from fedpurel_app.data.client import class_counts
    from fedpurel_app.peft.base import build_peft
    from fedpurel_app.protocol import Instruction

    torch.set_num_threads(1)
    cfg = run_cfg()
    counts = tuple(int(c) for c in class_counts(cfg.data, cfg.seed))

    times = []
    phi_g = None
    for k in range(clients):
        memory = DictMemory()
        client = Client(cfg, node(k, clients), memory, Instruction(1, "", counts))
        if phi_g is None:
            phi_g = build_peft(cfg, client.clip, client.data.classnames, client.data.template).global_state()
            client.train(phi_g)  # once per process: the first optimizer, the zero-shot text features
        start, cpu = time.perf_counter(), time.process_time()
        client.train(phi_g)
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times


REAL_START = """
import json, sys, time
marks = [(time.perf_counter(), time.process_time())]
import client_app.app, open_clip
marks.append((time.perf_counter(), time.process_time()))
sys.path.insert(0, "bench")
from common import run_cfg
from fedpurel_app.data.client import classes
from fedpurel_app.inputs import clip_of
from fedpurel_app.peft.base import build_peft
cfg = run_cfg(json.loads(sys.argv[1]))
classnames, template = classes(cfg.data)
peft = build_peft(cfg, clip_of(cfg.model, cfg.data), classnames, template)
marks.append((time.perf_counter(), time.process_time()))
print(*(b[i] - a[i] for a, b in zip(marks, marks[1:]) for i in (0, 1)))
"""


def fresh_starts(model_name: str | None, starts: int) -> list[tuple[float, ...]]:
    """(imports wall, CPU, model build wall, CPU, process wall) of ``starts`` fresh processes doing
    what a message does before its work: import the app (open_clip included) and build the model;
    ``model_name`` at its real size (random initial weights), None: the embedded default."""
    from real_size import run_config

    flat = json.dumps(run_config(model_name))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = []
    for _ in range(starts):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", REAL_START, flat], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"the fresh start failed:\n{proc.stderr[-3000:]}")
        out.append((*map(float, proc.stdout.split()[-4:]), wall))
    return out


# --- report --------------------------------------------------------------------------------------


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def report(run: dict, nodes: int, rounds: int) -> dict[str, float]:
    """Print the per-message table, the ratios and what a warm worker would hold; return the totals."""
    messages = parse(run["events"])
    bare = [m for window in run["bare_windows"] for m in in_window(messages, window)]
    ours = in_window(messages, run["ours_window"])
    missed = [m for m in bare + ours if not rows(m)]
    if not bare or not ours or missed:
        raise SystemExit(f"the probe missed messages (bare {len(bare)}, ours {len(ours)}, {len(missed)} incomplete)")
    if any(s.name == "import torch" for m in bare for s in m.process.spans):  # type: ignore[union-attr]
        print("WARNING: a bare ClientApp process imported torch")
    steady_bare = [m for m in bare if not m.first and m.kind == "train"]
    steady_ours = [m for m in ours if not m.first and m.kind == "train"]
    if not steady_bare or not steady_ours:
        raise SystemExit("no train message after each node's first: use --rounds >= 2")
    b, o = median_rows(steady_bare), median_rows(steady_ours)
    totals = {
        "bare": statistics.median(m.total for m in steady_bare),
        "ours": statistics.median(m.total for m in steady_ours),
        "bare cpu": statistics.median(map(process_cpu, steady_bare)),
        "ours cpu": statistics.median(map(process_cpu, steady_ours)),
    }
    print(
        f"\nper train message on a node: medians of {len(steady_bare)} bare / {len(steady_ours)} ours "
        "(each node's first message of a run left out); wall s and the ClientApp process's CPU s"
    )
    print(f"  {'':60} {'bare':>6} {'cpu':>6} {'ours':>6} {'cpu':>6}")
    for key in o:
        (bw, bc), (ow, oc) = b[key], o[key]
        print(f"  {key:60} {fmt(bw):>6} {fmt(bc):>6} {fmt(ow):>6} {fmt(oc):>6}")
    print(
        f"  {'total: message pulled -> reply pushed (node); process CPU':60} {fmt(totals['bare']):>6} "
        f"{fmt(totals['bare cpu']):>6} {fmt(totals['ours']):>6} {fmt(totals['ours cpu']):>6}"
    )
    print(
        f"ratio ours / bare: {totals['ours'] / totals['bare']:.2f}x wall ({fmt(totals['ours'])} / "
        f"{fmt(totals['bare'])} s), {totals['ours cpu'] / totals['bare cpu']:.2f}x ClientApp CPU "
        f"({fmt(totals['ours cpu'])} / {fmt(totals['bare cpu'])} s)"
    )
    firsts = ", ".join(
        f"{name} {m.kind} {m.total:.2f} s" for name, ms in (("bare", bare), ("ours", ours)) for m in ms if m.first
    )
    print(f"each node's first message of a run (FAB fetch and install; ours: features): {firsts}")
    evaluates = [m.total for m in ours if not m.first and m.kind == "evaluate"]
    if evaluates:
        print(f"ours, later evaluate messages: median {statistics.median(evaluates):.2f} s ({len(evaluates)})")
    held_wall, held_cpu = (sum(o[k][i] or 0.0 for k in HELD_ROWS) for i in (0, 1))
    train_wall, train_cpu = o["training / evaluation"]
    print(
        f"ours above the floor: {totals['ours'] - totals['bare']:.2f} s wall, "
        f"{totals['ours cpu'] - totals['bare cpu']:.2f} s CPU per message; imports, model build, data and "
        f"features (what a warm worker would hold): {held_wall:.2f} s wall, {held_cpu:.2f} s CPU; "
        f"training {train_wall:.2f} s wall, {train_cpu or 0.0:.2f} s CPU"
    )
    ours_rounds = [t for phase, t in _round_times(run["results"]).values() if phase == "global"]
    if run["bare_rounds"] and ours_rounds:
        print(
            f"ServerApp round (push -> last reply, {nodes} nodes), median: bare "
            f"{statistics.median(run['bare_rounds']):.2f} s | ours {statistics.median(ours_rounds):.2f} s "
            f"(rounds 2-{rounds} of each run)"
        )
    same = "Python and flwr imports (to run_clientapp)"
    print(
        f"the same code in both ({same}): bare {fmt(b[same][0])} s wall / {fmt(b[same][1])} s CPU, ours "
        f"{fmt(o[same][0])} / {fmt(o[same][1])} s: the load's difference between the runs"
    )
    return {**totals, "held": held_wall, "held cpu": held_cpu}


def _round_times(results: dict) -> dict[int, tuple[str, float]]:
    from deployment import round_times

    return round_times(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1, help="SuperNodes (1 or more)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of train messages of each app")
    parser.add_argument("--tls", action="store_true", help="TLS and node authentication (default: insecure)")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value for ours")
    parser.add_argument("--no-warm", dest="warm", action="store_false", help="skip the warm training times")
    parser.add_argument(
        "--real-size", metavar="MODEL", help="also time fresh starts with MODEL (e.g. ViT-B-16) and the embedded one"
    )
    parser.add_argument("--starts", type=int, default=2, help="fresh processes of --real-size, per model")
    parser.add_argument("--starts-only", action="store_true", help="only the fresh starts of --real-size")
    parser.add_argument("--events", type=Path, help="also write the probe's events (time, pid, process, what) here")
    args = parser.parse_args()
    if args.nodes < 1 or args.rounds < 2:
        raise SystemExit("--nodes must be >= 1 and --rounds >= 2")
    ours_config = " ".join(
        [
            f"train.rounds={args.rounds}",
            "personalize.rounds=0",
            "train.fraction=1.0",
            f"train.min-nodes={args.nodes}",
            f"eval-every={args.rounds}",
            *args.set,
        ]
    )
    if args.starts_only and not args.real_size:
        raise SystemExit("--starts-only needs --real-size MODEL")
    print(f"nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    if not args.starts_only:
        security = "TLS + node auth" if args.tls else "insecure"
        print(f"loopback federation: 1 SuperLink, {args.nodes} SuperNodes ({security})")
        print(f"bare: bench/bare_app, {args.rounds} rounds of train messages (1 KiB ArrayRecord + 1)")
        print(f"ours: embedded default with {ours_config}")
        start = time.perf_counter()
        run = both_runs(args.nodes, args.rounds, args.tls, ours_config)
        print(f"federation, both runs and stop: {time.perf_counter() - start:.1f} s")
        if args.events:
            args.events.write_text("".join("\t".join(map(str, event)) + "\n" for event in run["events"]))
        report(run, args.nodes, args.rounds)

    if args.warm and not args.starts_only:
        walls, cpus = zip(*warm_training(), strict=True)
        print(
            f"warm Stage-1 training per message, embedded default (20 clients, 1 thread, in this process): "
            f"median {statistics.median(walls) * 1000:.0f} ms wall ({statistics.median(cpus) * 1000:.0f} ms CPU), "
            f"max {max(walls) * 1000:.0f} ms"
        )
    if args.real_size:
        for model_name in (None, args.real_size):  # the embedded default, then the real size
            starts = fresh_starts(model_name, args.starts)
            iw, ic, bw, bc, wall = (statistics.median(c) for c in zip(*starts, strict=True))
            print(
                f"fresh message start, {model_name or 'embedded default'} (median of {args.starts}): imports "
                f"{iw:.1f} s wall / {ic:.1f} s CPU, model build {bw:.1f} s / {bc:.1f} s CPU, process {wall:.1f} s"
            )


if __name__ == "__main__":
    main()
