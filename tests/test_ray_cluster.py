"""Simulation on an existing Ray cluster (RAY_ADDRESS), and the one message a machine without the
app gets.

Unit tests (no cluster): a Ray worker's failed import, in both forms a reply can carry it, becomes
one user error that names the machine and says what to install; Flower's log of it is one line;
the strategy stops the run on it; the cluster check's actor count is Flower's own.

``test_a_simulation_runs_on_a_two_node_ray_cluster``: two Ray nodes started here with
``ray start`` (a head and a worker, one CPU each, every port on 127.0.0.1), ``scripts/run.sh``
with RAY_ADDRESS on them, evidence from each node's own log folder and from the cluster's actor
table that ClientApps ran on both nodes, and only the processes started here stopped afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from flwr.app import Error, Message, MessageType

from fedpurel_app.errors import ClientError
from fedpurel_cli import ray_cluster
from server_app import cluster
from server_app.cluster import HINT, MissingDependencyError, dependency_error
from server_app.strategy import FedPuReLStrategy

REPO = Path(__file__).resolve().parent.parent

# A reply's reason as Flower's simulation writes it (``str(type(ex)) + ":<'" + str(ex) + "'>"``)
# when a ClientApp actor cannot unpickle the ClientApp: Ray's text for that, from Ray 2.55.
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(RaySystemError)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
    "(pid=4242, ip=10.0.0.7, actor_id=fe0aa0ef8a6b3d22a3bc099901000000, repr=<flwr.simulation.ray_transport"
    ".ray_actor.ClientAppActor object at 0x7f0775fa8d10>)\n  At least one of the input arguments for this task "
    "could not be computed:\nray.exceptions.RaySystemError: System error: No module named 'client_app'\n"
    'traceback: Traceback (most recent call last):\n  File "/venv/ray/_private/serialization.py", line 360, '
    "in _deserialize_pickle5_data\n    obj = pickle.loads(in_band)\nModuleNotFoundError: No module named "
    "'client_app''>"
)


# --- the message of a machine without the app (no cluster) ------------------------------------


def test_a_ray_workers_failed_unpickling_becomes_one_message_naming_the_machine_and_the_fix():
    err = dependency_error(RAY_REASON)
    assert isinstance(err, MissingDependencyError)
    assert str(err) == f"the Ray worker at 10.0.0.7 cannot import 'client_app': {HINT}"
    assert "\n" not in str(err) and "Traceback" not in str(err)
    assert "install the same .venv and app on every machine of the cluster" in str(err)


def test_other_reasons_are_not_dependency_errors_and_supernodes_get_their_own_advice():
    assert dependency_error("ClientApp raised RuntimeError") is None
    assert dependency_error("NodeDataError: data-dir '/x' is empty") is None
    err = dependency_error("<class 'LoadClientAppError'>:<'No module named 'open_clip''>")
    assert str(err) == f"a client cannot import 'open_clip': {cluster.SUPERNODE_HINT}"


def test_a_clientapp_whose_import_fails_replies_with_a_user_error_naming_the_ray_worker(monkeypatch):
    from client_app.app import _user_errors_reply
    from tests.fake_grid import set_task_identity

    set_task_identity(monkeypatch)
    from fedpurel_app import protocol

    def handler(msg, context):
        import fedpurel_missing_dependency  # noqa: F401

    class FakeRay:  # what a ClientApp actor sees: Ray initialised in its process
        class util:
            @staticmethod
            def get_node_ip_address():
                return "10.0.0.8"

        @staticmethod
        def is_initialized():
            return True

    request = Message(_empty(), dst_node_id=5, message_type=MessageType.TRAIN)
    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    reply = _user_errors_reply(handler)(request, None)
    assert reply.has_error() and reply.error.code == protocol.USER_ERROR
    assert reply.error.reason == (
        f"MissingDependencyError: the Ray worker at 10.0.0.8 cannot import 'fedpurel_missing_dependency': {HINT}"
    )
    # The server reads the reply as the same error, from a Ray worker: the run stops on it.
    assert str(dependency_error(reply.error.reason)) == reply.error.reason.removeprefix("MissingDependencyError: ")
    monkeypatch.delitem(sys.modules, "ray")
    reply = _user_errors_reply(handler)(request, None)
    assert "a client cannot import 'fedpurel_missing_dependency'" in reply.error.reason


def _empty():
    from flwr.app import RecordDict

    return RecordDict({})


def test_the_strategy_stops_the_run_at_once_on_a_ray_worker_without_the_app(caplog, monkeypatch):
    from tests.fake_grid import set_task_identity

    set_task_identity(monkeypatch)
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = Message(_empty(), dst_node_id=7, message_type=MessageType.TRAIN)
    bad = Message(Error(code=0, reason=RAY_REASON), reply_to=request)
    with pytest.raises(MissingDependencyError, match=r"^the Ray worker at 10\.0\.0\.7 cannot import 'client_app'"):
        strategy.read_replies("round 1", [bad], lambda m: m)
    # Elsewhere (a SuperNode) the reply is logged in one line and the round goes on without it.
    other = Message(Error(code=0, reason="<class 'X'>:<'No module named 'peft''>"), reply_to=request)
    with caplog.at_level("WARNING", logger="flwr"), pytest.raises(ClientError, match="a client cannot import 'peft'"):
        strategy.read_replies("round 1", [other], lambda m: m)
    assert "a client cannot import 'peft'" in caplog.text


def test_flowers_log_of_the_failed_actor_is_one_line_and_its_traceback_is_dropped():
    flwr = logging.getLogger("flwr")
    assert any(isinstance(f, cluster.RayImportTracebacks) for f in flwr.filters)
    exception = RuntimeError(RAY_REASON.split(":<'", 1)[1])  # Flower logs the exception object itself
    record = logging.LogRecord("flwr", logging.ERROR, __file__, 1, exception, (), None)
    assert cluster.RayImportTracebacks().filter(record)
    assert record.getMessage() == (
        f"the Ray worker at 10.0.0.7 cannot import 'client_app': {HINT} (the run stops: see the FedPuReL message)"
    )
    traceback_text = "Traceback (most recent call last):\n  ...\nray.exceptions.RayTaskError: " + RAY_REASON
    record = logging.LogRecord("flwr", logging.ERROR, __file__, 1, traceback_text, (), None)
    assert not cluster.RayImportTracebacks().filter(record)
    other = logging.LogRecord("flwr", logging.ERROR, __file__, 1, "Traceback (most recent call last): a bug", (), None)
    assert cluster.RayImportTracebacks().filter(other)


def test_the_cluster_checks_actor_count_is_flowers_own(monkeypatch):
    pytest.importorskip("ray")
    from flwr.simulation.ray_transport import ray_actor

    nodes = [
        {"Resources": {"CPU": 4.0, "GPU": 1.0}},
        {"Resources": {"CPU": 3.0}},
        {"Resources": {"CPU": 8.0, "GPU": 2.0}},
        {"Resources": {}},  # a node that left
    ]
    monkeypatch.setattr(ray_actor.ray, "nodes", lambda: nodes)
    for cpus, gpus in [(1, 0.0), (2, 0.0), (1, 0.25), (1, 1.0), (3, 0.5)]:
        want = ray_actor.pool_size_from_resources({"num_cpus": cpus, "num_gpus": gpus})
        assert ray_cluster.actors_that_fit(nodes, cpus, gpus) == want, (cpus, gpus)


def test_the_cluster_checks_problems_name_the_node_and_the_fix():
    here = {"python": "3.11.7", "app": "a" * 64, "checkpoints": {"clip.safetensors": "1"}, "missing": [], "data": ""}
    node = {**here, "missing": ["open_clip", "peft"], "data": "", "checkpoints": {}}
    problems, notes = ray_cluster.problems_of("10.0.0.9 (node 1)", node, here, "mnist-animals")
    assert problems == [f"the Ray worker at 10.0.0.9 (node 1) cannot import open_clip, peft: {HINT}"]
    assert len(notes) == 1 and "pretrain their own" in notes[0]
    other = {**here, "app": "b" * 64, "data": "dataset 'mnist-animals' needs the package 'animal-mnist'"}
    problems, _ = ray_cluster.problems_of("10.0.0.9", other, here, "mnist-animals")
    assert any("cannot find the dataset 'mnist-animals'" in p and "animal-mnist" in p for p in problems)
    assert any("other app files than this machine" in p for p in problems)
    assert ray_cluster.problems_of("x", here, here, "mnist") == ([], [])


def test_an_unreachable_cluster_is_one_line_and_no_wait(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    started = time.perf_counter()
    assert ray_cluster.main(["train.rounds=1"]) == 2
    assert time.perf_counter() - started < 60, "one failed connection, not minutes of retries"
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedpurel: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:") and "\n" not in err


def test_the_probe_finds_this_machines_app_and_data():
    report = ray_cluster.probe(ray_cluster.CLIENT_MODULES, "mnist-animals-blur", "", "")
    assert report["missing"] == [] and report["data"] == "" and len(report["app"]) == 64
    report = ray_cluster.probe(("fedpurel_missing_dependency", "torch"), "cifar10-lt", "/nonexistent/data", "")
    assert report["missing"] == ["fedpurel_missing_dependency"]
    assert report["data"] == "data.root /nonexistent/data is not a folder on this machine"


# --- a real two-node cluster ----------------------------------------------------------------

# `ray start` replaces a node address of 127.0.0.1 by the machine's own address, and its GCS and
# raylets then listen on every interface. Kept at 127.0.0.1 they listen on loopback only: this
# starts Ray's own CLI with that replacement turned off.
RAY_START = (
    "import sys\n"
    "import ray._private.services as services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "main()\n"
)
LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}
STARTED = "Ray runtime started."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_range(size: int) -> tuple[int, int]:
    """``size`` consecutive ports that are free now (the node's worker ports)."""
    for _ in range(200):
        start = random.randrange(20000, 60000 - size)
        try:
            for port in range(start, start + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start, start + size - 1
    raise RuntimeError("no free port range")


def _node_args(temp_dir: Path) -> list[str]:
    low, high = _free_range(40)
    return [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--min-worker-port={low}",
        f"--max-worker-port={high}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--block",
    ]


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, command line) of every process but zombies."""
    # -ww: whole command lines (without it ps cuts them at 80 columns when it has no terminal).
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) >= 4 and not parts[3].startswith("Z"):  # a zombie runs nothing any more
            table[int(parts[0])] = (int(parts[1]), int(parts[2]), parts[4] if len(parts) > 4 else "")
    return table


def _ours(sessions: set[int], marks: tuple[str, ...]) -> set[int]:
    """The processes started here: in our sessions, or with one of ``marks`` in their command
    line (the SuperLink, by its FLWR_HOME), and every descendant of those."""
    table = _processes()
    ours = {pid for pid, (_, sid, args) in table.items() if sid in sessions or any(m in args for m in marks)}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in ours and pid not in ours}
        ours |= more
        grew = bool(more)
    return ours


def _listening() -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every listening TCP socket (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        address, _, port = fields[3].rpartition(":")
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', fields[5]):
            rows.append((address, int(port), int(pid), name))
    return rows


class Node:
    """One ``ray start --block`` in its own session (process group), with its own temp dir."""

    def __init__(self, name: str, args: list[str], base: Path, env: dict) -> None:
        self.name, self.attempts = name, 0
        for attempt in range(3):  # a raylet gets 30 s to register: on a busy machine, try again
            self.attempts += 1
            self.dir, self.log = base / f"{name}-{attempt}", base / f"{name}-{attempt}.log"
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", RAY_START, "start", *args, *_node_args(self.dir)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and self.proc.poll() is None:
                if STARTED in self.log.read_text(errors="replace"):
                    return
                time.sleep(0.5)
            self.stop()
            if attempt == 2:
                raise RuntimeError(f"ray start ({name}) failed:\n{self.log.read_text()[-3000:]}")

    @property
    def session(self) -> int:
        return self.proc.pid  # start_new_session: the session and group ids are its pid

    def session_dir(self) -> Path:
        """The node's session folder (session_latest is a link to it)."""
        (folder,) = [p for p in self.dir.glob("session_*") if not p.is_symlink()]
        return folder

    def node_id(self) -> str:
        raylet = self.session_dir() / "logs" / "raylet.out"
        return re.search(r"Setting node ID node_id=([0-9a-f]+)", raylet.read_text()).group(1)

    def actor_logs(self, actor: str) -> list[Path]:
        """This node's worker logs of ``actor`` (Ray writes ':actor_name:<class>' in each)."""
        logs = (self.session_dir() / "logs").glob("worker-*.out")
        return sorted(p for p in logs if f":actor_name:{actor}\n" in p.read_text(errors="replace"))

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap `ray start` itself once it exits
                if not any(sid == self.session for _, sid, _ in _processes().values()):
                    return
                time.sleep(0.5)


def test_a_simulation_runs_on_a_two_node_ray_cluster():
    pytest.importorskip("ray")
    base = Path(tempfile.mkdtemp(prefix="fedpurel-ray-"))  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_prestart_worker_first_driver="0", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    # The drivers (run.sh's check, Flower's, this test's) resolve 127.0.0.1 to loopback as well,
    # as Ray does on macOS (the nodes themselves need the default: a worker node refuses it).
    driver_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    gcs = _free_port()
    nodes: list[Node] = []
    flwr_home = base / "flwr-home"
    seen: dict[tuple[str, int, int], str] = {}
    watch_errors: list[str] = []
    stop_watch = threading.Event()
    started = time.perf_counter()
    try:
        nodes.append(
            Node(
                "head",
                ["--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={_free_port()}"],
                base,
                env,
            )
        )
        nodes.append(Node("worker", [f"--address=127.0.0.1:{gcs}"], base, env))
        sessions = {n.session for n in nodes}
        nodes_up = time.perf_counter() - started

        def watch() -> None:  # every listening socket of our processes, while the run goes on
            while not stop_watch.is_set():
                try:
                    ours = _ours(sessions, (str(flwr_home),))
                    for address, port, pid, name in _listening():
                        if pid in ours:
                            seen[(address, port, pid)] = name
                except Exception as err:  # noqa: BLE001 - reported by the test below
                    watch_errors.append(repr(err))
                stop_watch.wait(1.0)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # Flower's local SuperLink on ports of its own: no other simulation on this machine shares them.
        superlink_port = _free_port()
        run_env = {
            **driver_env,
            "RAY_ADDRESS": f"127.0.0.1:{gcs}",
            "NUM_SUPERNODES": "4",
            "OUTPUT_DIR": str(base / "outputs"),
            "FLWR_HOME": str(flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(superlink_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        }
        overrides = (
            "train.rounds=1 personalize.rounds=1 train.local-epochs=1 personalize.epochs=1 "
            "train.fraction=0.5 data.client-test-size=20 track.tensorboard=false data.name='mnist-animals'"
        )
        proc = subprocess.run(
            ["bash", "scripts/run.sh", overrides],
            cwd=REPO,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        stop_watch.set()
        watcher.join()
        run_s = time.perf_counter() - started - nodes_up
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

        # What run.sh said before `flwr run`: the cluster it attaches to, its nodes and resources.
        assert re.search(
            rf"fedpurel: attaching to the Ray cluster at 127\.0\.0\.1:{gcs}: 2 node\(s\), 2 CPU\(s\), 0 GPU\(s\); "
            r"2 ClientApp actor\(s\) fit",
            proc.stdout,
        ), proc.stdout[-3000:]
        ids = {n.name: n.node_id() for n in nodes}
        assert ids["head"] != ids["worker"]
        for node_id in ids.values():
            assert f"node {node_id[:12]} 127.0.0.1: 1 CPU(s), 0 GPU(s)" in proc.stdout
        assert list((base / "outputs").glob("*/results.json")), "no results"

        # Evidence 1: each node's own log folder holds the logs of ClientApp actors that ran there.
        per_node = {n.name: n.actor_logs("ClientAppActor") for n in nodes}
        assert all(per_node.values()), per_node
        # Evidence 2: the cluster's actor table, with the node of each ClientApp actor.
        actors = _client_app_actors(f"127.0.0.1:{gcs}", driver_env)
        assert {a["node"] for a in actors} == set(ids.values()), (actors, ids)
        pids = {int(p.name.rsplit("-", 1)[1].removesuffix(".out")) for logs in per_node.values() for p in logs}
        assert {a["pid"] for a in actors} <= pids

        # A real Ray worker's failed import, read by the server as the run does: one clear line.
        reason = _failed_unpickling_reason(f"127.0.0.1:{gcs}", ids["worker"], driver_env)
        assert str(dependency_error(reason)) == f"the Ray worker at 127.0.0.1 cannot import 'fedpurel_nowhere': {HINT}"

        # Every port our processes listened on, Ray's and Flower's, was on loopback.
        assert watch_errors == [] and seen, watch_errors
        assert superlink_port in {port for _, port, _ in seen}, sorted(seen.items())
        assert {a for a, _, _ in seen} <= LOOPBACK, sorted(seen.items())
        names = sorted({name for name in seen.values()})
        print(
            f"\nnode ids: head {ids['head']}, worker {ids['worker']}; ClientApp actors: "
            f"{[(a['node'][:12], a['pid']) for a in actors]}; actor logs per node: "
            f"{ {k: len(v) for k, v in per_node.items()} }; ray start attempts {[n.attempts for n in nodes]}; "
            f"listening sockets: {len(seen)} "
            f"on {sorted({a for a, _, _ in seen})} by {names}: "
            f"{[f'{a}:{p} {n}' for (a, p, _), n in sorted(seen.items())]}; "
            f"nodes up in {nodes_up:.0f} s, run.sh {run_s:.0f} s, "
            f"wall {time.perf_counter() - started:.0f} s"
        )
    finally:
        stop_watch.set()
        sessions = {n.session for n in nodes}
        for node in reversed(nodes):
            node.stop()
        # Ray's workers may outlive their raylet for a moment (each in its own session).
        deadline = time.monotonic() + 60
        while (left := _ours(sessions, (str(base),))) and time.monotonic() < deadline:
            time.sleep(1.0)
        table = _processes()
        lingering = {pid: table[pid][2][:200] for pid in left if pid in table}
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(base)], check=False)
    assert left == set(), f"processes left running 60 s after their nodes stopped: {lingering}"


def _client_app_actors(address: str, env: dict) -> list[dict]:
    """Flower's ClientApp actors in the cluster's actor table (GCS): node id and pid of each."""
    code = (
        "import json, ray\n"
        "import ray._private.state as state\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "rows = [{'node': a['Address']['NodeID'], 'pid': a['Pid'], 'state': a['State']}\n"
        "        for a in state.actors().values() if a['ActorClassName'] == 'ClientAppActor']\n"
        "print(json.dumps(rows))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def _failed_unpickling_reason(address: str, node_id: str, env: dict) -> str:
    """Flower's reply reason for an actor on ``node_id`` that cannot unpickle what it is sent
    (an argument whose unpickling imports a module missing there), as Flower builds it."""
    code = (
        "import importlib, ray\n"
        "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy\n"
        "class Missing:\n"
        "    def __reduce__(self):\n"
        "        return (importlib.import_module, ('fedpurel_nowhere',))\n"
        "@ray.remote(num_cpus=0)\n"
        "class ClientAppActor:\n"
        "    def run(self, app, cid):\n"
        "        return cid\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"actor = ClientAppActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy({node_id!r}, soft=False))"
        ".remote()\n"
        "try:\n"
        "    ray.get(actor.run.remote(Missing(), '0'))\n"
        "except Exception as ex:\n"
        '    print(repr(str(type(ex)) + ":<\'" + str(ex) + "\'>"))\n'
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import ast

    return ast.literal_eval(out.stdout.strip().splitlines()[-1])
