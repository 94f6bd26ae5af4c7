"""A real deployment on loopback: deploy/start.sh -> SuperLink + 3 SuperNodes, TLS and node auth on.

Every process is real (flower-superlink, flower-supernode, their SuperExecs, one
ClientApp process per message) and is stopped by deploy/stop.sh in the fixture's
finalizer, also when a test fails. One federation serves the whole module:

1. TLS and node authentication are on (flags, certificate chain, plain HTTP refused);
2. a SuperNode whose key was never registered is refused by the SuperLink;
3. the app runs end to end on the 3 nodes (results.json checked);
4. a SuperNode killed (SIGKILL of its process group: a crashed host) during Stage 1
   is detected by heartbeat and the run completes with the other two; restarted
   with the same key, the node rejoins under the same node ID;
5. a new run's fresh ClientApps restore phi_k from the state-dirs (the restarted node's too);
6. the same Stage-1 round through SecAgg+ (secagg.enabled) gives the plain run's FedAvg within
   SecAgg+'s quantization, and no reply that reaches the ServerApp holds an array;
7. a SuperNode killed and restarted between two personalization rounds of one run
   continues from the phi_k in its state-dir.

Every node holds its own data folder (node-config data-dir, written from its
partition of the embedded dataset before the federation starts) and reads nothing else.

Ports are picked free at random, so the module runs beside other Flower processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from deploy.loopback import loopback_env, message_start_cost

REPO = Path(__file__).resolve().parent.parent
FLWR = REPO / ".venv" / "bin" / "flwr"
FEDPUREL = REPO / ".venv" / "bin" / "fedpurel"
NUM_NODES = 3
TINY = (
    "train.rounds=2 personalize.rounds=1 train.local-epochs=1 personalize.epochs=1 data.client-test-size=30 "
    "train.fraction=0.67 train.min-nodes=3"
)
# (b): one Stage-1 round; train.min-nodes=2 so that the rounds after the kill go on with two nodes;
# round-timeout bounds the wait should heartbeat detection ever fail.
KILL_RUN = (
    "train.rounds=1 personalize.rounds=0 train.local-epochs=1 data.client-test-size=30 train.min-nodes=2 "
    "round-timeout=150"
)
# (c): the same round on all three nodes, plain and through SecAgg+.
ONE_ROUND = KILL_RUN.replace("train.min-nodes=2", "train.min-nodes=3")


class Federation:
    def __init__(self, root: Path):
        self.dir = root
        self.env = loopback_env(root, NUM_NODES)
        self.timings: dict[str, float] = {}

    def script(
        self, name: str, *args: str, timeout: float = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(REPO / "deploy" / name), *args],
            cwd=REPO,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        env = {**self.env, "FLWR_HOME": str(self.dir / "flwr-home")}
        return subprocess.run([str(FLWR), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    def nodes(self) -> list[dict]:
        out = self.flwr("supernode", "ls", "fedpurel-deploy", "--format", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout)["nodes"]

    def online(self) -> set[str]:
        return {n["node-id"] for n in self.nodes() if n["status"] == "online"}

    def pids(self) -> dict[str, int]:
        lines = (self.dir / "pids").read_text().split("\n")
        return {name: int(pid) for name, pid in (line.split() for line in lines if line.strip())}

    def node_id(self, i: int) -> str:
        return (self.dir / "nodes" / str(i) / "node-id").read_text().strip()

    def log(self, name: str) -> str:
        path = self.dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def processes(self) -> list[str]:
        """Every process whose command line mentions this deployment or its ports."""
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        marks = [str(self.dir), f":{self.env['SUPERLINK_PORT']}"]
        return [line for line in ps if any(m in line for m in marks) and "ps -eo" not in line]


def _report(config, line: str) -> None:
    """A line in pytest's terminal output (visible without -s)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def test_clientapp_message_start_cost(request):
    """What every ClientApp message pays in deployment before training: a fresh process
    importing the ClientApp (torch, open_clip, flwr), building its model and its first optimizer."""
    imports, build, optimizer, wall = message_start_cost()
    _report(
        request.config,
        f"\n[clientapp message start] fresh process: imports {imports:.1f}s, "
        f"model build {build:.1f}s, first optimizer {optimizer:.1f}s, wall {wall:.1f}s",
    )
    assert 0 < imports + build + optimizer < wall < 240


@pytest.fixture(scope="module")
def fed(tmp_path_factory, request):
    federation = Federation(tmp_path_factory.mktemp("deploy"))

    def stop():
        out = federation.script("stop.sh", timeout=120)
        left = federation.processes()
        timing = ", ".join(f"{k} {v:.0f}s" for k, v in federation.timings.items())
        _report(request.config, f"\n[deployment timings] {timing}")
        assert out.returncode == 0, out.stdout + out.stderr
        assert left == [], f"processes left running after deploy/stop.sh: {left}"

    request.addfinalizer(stop)  # registered before starting: a half-started federation is stopped too
    # Each node's own data: its partition of the embedded dataset, written as a data-dir.
    for i in range(NUM_NODES):
        export = subprocess.run(
            [
                str(FEDPUREL),
                "node-data",
                str(federation.dir / "data" / str(i)),
                "--partition-id",
                str(i),
                "--num-partitions",
                str(NUM_NODES),
                "--set",
                "data.client-test-size=30",
            ],
            cwd=REPO,
            env=federation.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert export.returncode == 0, export.stdout + export.stderr
    federation.env["NODE_DATA_ROOT"] = str(federation.dir / "data")
    t0 = time.monotonic()
    out = federation.script("start.sh", str(NUM_NODES), timeout=300)
    federation.timings["start"] = time.monotonic() - t0
    assert out.returncode == 0, (
        out.stdout + out.stderr + "".join(federation.log(n) for n in ("superlink", "supernode-0"))
    )
    return federation


def test_tls_and_node_authentication_are_on(fed):
    link = Path(f"/proc/{fed.pids()['superlink']}/cmdline").read_bytes().split(b"\0")
    args = [a.decode() for a in link]
    assert "--enable-supernode-auth" in args and "--insecure" not in args
    assert args[args.index("--ssl-certfile") + 1] == str(fed.dir / "certs" / "server.pem")
    assert "--disable-runtime-dependency-installation" in args
    for i in range(NUM_NODES):
        node = [a.decode() for a in Path(f"/proc/{fed.pids()[f'supernode-{i}']}/cmdline").read_bytes().split(b"\0")]
        assert node[node.index("--root-certificates") + 1] == str(fed.dir / "certs" / "ca.crt")
        assert node[node.index("--auth-supernode-private-key") + 1] == str(fed.dir / "keys" / f"supernode-{i}")
        assert f"partition-id={i} num-partitions={NUM_NODES} state-dir='{fed.dir}/nodes/{i}/state'" in " ".join(node)
        assert f"data-dir='{fed.dir}/data/{i}'" in " ".join(node), "each node reads its own data folder"
    config = (fed.dir / "flwr-home" / "config.toml").read_text()
    assert f'root-certificates = "{fed.dir}/certs/ca.crt"' in config and "insecure" not in config
    # The SuperLink's certificate verifies against our CA for 127.0.0.1 ...
    port = int(fed.env["SUPERLINK_PORT"])
    ctx = ssl.create_default_context(cafile=str(fed.dir / "certs" / "ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # ... not against the system CAs, and plain HTTP gets no HTTP answer.
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            reply = raw.recv(100)
        except (TimeoutError, ConnectionResetError):
            reply = b""
        assert not reply.startswith(b"HTTP/1.1 200")
    # Private material is owner-only.
    for path in (fed.dir / "certs" / "server.key", fed.dir / "keys" / "supernode-0", fed.dir / "nodes" / "0" / "state"):
        assert path.stat().st_mode & 0o077 == 0, path
    assert len(fed.online()) == NUM_NODES


def test_a_supernode_without_a_registered_key_is_refused(fed):
    registered = {n["node-id"] for n in fed.nodes()}
    no_data = {k: v for k, v in fed.env.items() if k != "NODE_DATA_ROOT"}  # an intruder brings no data folder
    out = fed.script("start.sh", "--node", str(NUM_NODES), "--no-register", timeout=120, env=no_data)
    assert out.returncode == 0, out.stdout + out.stderr
    pid = fed.pids()[f"supernode-{NUM_NODES}"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.5)
    log = fed.log(f"supernode-{NUM_NODES}")
    assert not _running(pid), "the unregistered SuperNode is still running:\n" + log
    assert "Failed to activate SuperNode" in log and "Exit Code: 305" in log, log
    assert "SuperNode ID" not in log
    nodes = fed.nodes()
    assert {n["node-id"] for n in nodes} == registered, "the refused key was added to the federation"
    assert len([n for n in nodes if n["status"] == "online"]) == NUM_NODES


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _results(out_dir: Path) -> dict:
    (path,) = out_dir.glob("*/results.json")
    assert (path.parent / "phi_g.safetensors").is_file()
    return json.loads(path.read_text())


def test_the_app_runs_end_to_end_on_the_deployed_federation(fed):
    out_dir = fed.dir / "outputs-e2e"
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "deploy" / "run.sh"), TINY],
        cwd=REPO,
        env={**fed.env, "OUTPUT_DIR": str(out_dir)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    fed.timings["run (a)"] = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "finished:completed" in proc.stdout
    results = _results(out_dir)
    assert results["config"]["train.rounds"] == 2 and results["config"]["train.min-nodes"] == 3
    assert [(r["round"], r["phase"]) for r in results["rounds"]] == [(1, "global"), (2, "global"), (3, "personal")]
    assert results["rounds"][0]["train"]["clients"] == NUM_NODES, "round 1 trains every node"
    assert results["rounds"][1]["train"]["clients"] == 2, "round 2: train.fraction 0.67 of 3 nodes"
    pm = results["final"]["pm"]
    assert pm["num_clients"] == NUM_NODES and pm["personalized"]
    classes = len(results["zero_shot"]["gm"]["per_class"])
    assert classes >= 10
    for gm in (results["zero_shot"]["gm"], results["final"]["gm"]):
        assert 0.0 <= gm["all"] <= 1.0 and len(gm["per_class"]) == classes
    assert "Received 3 results and 0 failures" in proc.stdout
    # The run is visible to `flwr ls` / `flwr log` through the deployment's connection.
    run_id = (fed.dir / "last-run-id").read_text().strip()
    logs = fed.flwr("log", run_id, "fedpurel-deploy", "--show")
    assert "[fedpurel] results:" in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]


def _kill_group(pid: int) -> None:
    """SIGKILL a SuperNode with everything it started (a crashed host: nothing is shut down cleanly)."""
    tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid"], capture_output=True, text=True).stdout.split("\n")[1:]
    rows = [tuple(map(int, r.split())) for r in tree if r.strip()]
    victims = {p for p, _, g in rows if g == pid} | {pid}
    grew = True
    while grew:
        more = {p for p, pp, _ in rows if pp in victims} - victims
        grew = bool(more)
        victims |= more
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_supernode_killed_during_stage_1_and_the_run_completes_with_the_others(fed):
    out_dir = fed.dir / "outputs-kill"
    victim = NUM_NODES - 1
    victim_id = fed.node_id(victim)
    assert victim_id in fed.online()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(REPO / "deploy" / "run.sh"), KILL_RUN],
        cwd=REPO,
        env={**fed.env, "OUTPUT_DIR": str(out_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    killed_at = None
    timer = threading.Timer(900, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            # The zero-shot line is logged right before round 1's train messages go out.
            if killed_at is None and "[fedpurel] zero-shot" in line:
                _kill_group(fed.pids()[f"supernode-{victim}"])
                killed_at = time.monotonic()
        rc = proc.wait()
    finally:
        timer.cancel()
    done = time.monotonic()
    fed.timings["run (b)"] = done - t0
    fed.timings["(b) kill -> end"] = done - (killed_at or done)
    text = "".join(lines)
    assert killed_at is not None, "the run never reached Stage 1:\n" + text[-4000:]
    assert rc == 0, text[-4000:]
    assert "finished:completed" in text
    # Round 1 went to all three nodes and was aggregated from the two that answered.
    assert "Node Unavailable" in text and "aggregate_train: Received 2 results" in text, text[-4000:]
    results = _results(out_dir)
    assert results["rounds"][0]["train"]["clients"] == NUM_NODES
    assert results["final"]["pm"]["num_clients"] == NUM_NODES - 1
    assert victim_id not in fed.online()

    # Restarted with the same key, the node rejoins under the same node ID.
    fed.script("stop.sh", "--node", str(victim), timeout=60)
    out = fed.script("start.sh", "--node", str(victim), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and victim_id not in fed.online():
        time.sleep(1)
    assert victim_id in fed.online(), fed.log(f"supernode-{victim}")[-3000:]


@pytest.fixture(scope="module")
def one_round(fed):
    """A plain run of ONE_ROUND on all nodes (after (a) and (b): it is also the restart check's run),
    with the SHA-256 of each node's phi_k file before it."""
    import hashlib

    files = [fed.dir / "nodes" / str(i) / "state" / "phi_k.safetensors" for i in range(NUM_NODES)]
    before = [hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None for f in files]
    out_dir = fed.dir / "outputs-one-round"
    t0 = time.monotonic()
    proc = _deploy_run(fed, ONE_ROUND, out_dir)
    fed.timings["run (c)"] = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"proc": proc, "out": out_dir, "phi_k": files, "before": before}


def _deploy_run(fed, overrides: str, out_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "deploy" / "run.sh"), overrides],
        cwd=REPO,
        env={**fed.env, "OUTPUT_DIR": str(out_dir)},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_restarted_supernode_keeps_its_phi_k_on_disk(fed, one_round):
    """After (a) every node saved phi_k in its state-dir; the node killed and restarted in (b)
    still has that file, unchanged and owner-only, and a new run's ClientApp (a fresh process
    with an empty context.state) personalizes with it: every node, the restarted one included,
    reports a personalized prediction although this run trains no Stage 2."""
    import hashlib

    victim = NUM_NODES - 1
    phi_k = one_round["phi_k"][victim]
    assert one_round["before"][victim] is not None, "run (a) did not save phi_k in the node's state-dir"
    assert phi_k.stat().st_mode & 0o777 == 0o600
    proc = one_round["proc"]
    pm = _results(one_round["out"])["final"]["pm"]
    assert pm["num_clients"] == NUM_NODES
    assert pm["personalized_clients"] == NUM_NODES, "a node lost its phi_k across the restart"
    # This run's first message to each node (a new run: an empty context.state) restored phi_k.
    assert f"{NUM_NODES} of {NUM_NODES} clients restored their private state" in proc.stdout, proc.stdout[-3000:]
    assert hashlib.sha256(phi_k.read_bytes()).hexdigest() == one_round["before"][victim]


def test_stage_1_through_secagg_gives_plain_fedavg_within_quantization_and_the_server_no_update(
    fed, one_round, request
):
    """The same run as the plain one above with secagg.enabled, over TLS with node authentication:
    SecAgg+'s four exchanges, phi_g equal to the plain run's FedAvg within SecAgg+'s quantization,
    and no reply that reached the ServerApp held an array."""
    from safetensors.torch import load_file

    from server_app.secagg import quantization_bound

    out_dir = fed.dir / "outputs-secagg"
    t0 = time.monotonic()
    proc = _deploy_run(fed, ONE_ROUND + " secagg.enabled=true", out_dir)
    fed.timings["run (secagg)"] = time.monotonic() - t0
    assert proc.returncode == 0 and "finished:completed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Secure aggregation completed." in proc.stdout
    results = _results(out_dir)
    train = results["rounds"][0]["train"]
    assert (train["clients"], train["secagg-contributors"]) == (NUM_NODES, NUM_NODES)
    assert train["secagg-replies"] == 4 * NUM_NODES and train["secagg-arrays-received"] == 0
    assert "secagg-contributors" not in _results(one_round["out"])["rounds"][0]["train"]
    plain = load_file(str(next(one_round["out"].glob("*/phi_g.safetensors"))))
    secure = load_file(str(next(out_dir.glob("*/phi_g.safetensors"))))
    error = max(float((secure[k].double() - plain[k].double()).abs().max()) for k in plain)
    # Round 1 takes every node: the weights n_k / W sum to 1 (W the total), so the bound is that
    # of equal shares of W, plus float32's rounding of phi_g.
    bound = quantization_bound(8.0, [1] * NUM_NODES, NUM_NODES, 4194304) + 1e-6
    _report(request.config, f"\n[secagg deployment] max |SecAgg+ - plain FedAvg| = {error:.3g} (bound {bound:.3g})")
    assert 0 < error <= bound, (error, bound)


def test_a_supernode_restarted_between_rounds_continues_from_its_phi_k(fed):
    """Restart a node (stop.sh / start.sh --node: same key, same node ID, a fresh process with
    an empty context.state) right after a personalization round of a run: it restores phi_k
    from its state-dir and keeps personalizing in the run's next rounds."""
    import hashlib

    victim = 0
    phi_k = fed.dir / "nodes" / str(victim) / "state" / "phi_k.safetensors"
    out_dir = fed.dir / "outputs-between-rounds"
    # Enough personal rounds (one message per node each) for the restarted node to be back
    # online before the last one: the SuperLink takes up to a minute to let its key in again.
    run = (
        "train.rounds=1 personalize.rounds=12 train.local-epochs=1 personalize.epochs=1 data.client-test-size=30 "
        "train.min-nodes=2 round-timeout=120 seed=7"
    )
    proc = subprocess.Popen(
        ["bash", str(REPO / "deploy" / "run.sh"), run],
        cwd=REPO,
        env={**fed.env, "OUTPUT_DIR": str(out_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    state: dict = {}
    timer = threading.Timer(1200, proc.kill)
    timer.start()

    def restart():
        fed.script("stop.sh", "--node", str(victim), timeout=60)
        state["log_offset"] = len(fed.log(f"supernode-{victim}"))
        # The SuperLink refuses the key (exit 305) until it has marked the old process offline:
        # start again whenever the new process exits, until the node is online.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            fed.script("start.sh", "--node", str(victim), timeout=60)
            pid = fed.pids()[f"supernode-{victim}"]
            while time.monotonic() < deadline and _running(pid):
                if fed.node_id(victim) in fed.online():
                    state["back"] = time.monotonic()
                    state["back_line"] = len(lines)
                    return
                time.sleep(1)
            time.sleep(5)

    restarter = threading.Thread(target=restart)
    try:
        for line in proc.stdout:
            lines.append(line)
            if "saved" not in state and "[fedpurel] round 2/13 personal" in line:  # first Stage-2 round done
                state["saved"] = hashlib.sha256(phi_k.read_bytes()).hexdigest()
                restarter.start()
        rc = proc.wait()
    finally:
        timer.cancel()
        if restarter.is_alive():
            restarter.join(timeout=300)
    text = "".join(lines)
    assert "saved" in state, "the run never finished a personalization round:\n" + text[-4000:]
    assert rc == 0 and "finished:completed" in text, text[-4000:]
    assert "back" in state, "the restarted node never came back online:\n" + fed.log(f"supernode-{victim}")[-3000:]
    # The restarted node (a fresh context.state) restored phi_k from its state-dir in its first
    # message after the restart; the others still held theirs in their context.state.
    after = "".join(lines[state["back_line"] :])
    assert re.search(r"round \d+ personalization: 1 of 3 clients restored their private state", after), (
        after[-3000:] + fed.log(f"supernode-{victim}")[state["log_offset"] :][-3000:]
    )
    assert hashlib.sha256(phi_k.read_bytes()).hexdigest() != state["saved"], "the restarted node never trained again"
    pm = _results(out_dir)["final"]["pm"]
    assert pm["num_clients"] == NUM_NODES and pm["personalized_clients"] == NUM_NODES
