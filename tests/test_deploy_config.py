"""The deployment files agree with each other and with pyproject.toml.

Checks on deploy/compose*.yml, docker/*.Dockerfile, .dockerignore, deploy/systemd/* and the
deploy/ scripts: image tags and the flwr version match the app's pin; every SuperNode
has its own partition-id, port, network, state, data and key; TLS material has the names
deploy/certs.sh and deploy/keys.sh write; ports agree with deploy/common.sh; only
127.0.0.1 is published by default; every Flower service has a healthcheck that its
dependants wait for.

The compose files are resolved by `docker compose config` where a compose plugin works,
and otherwise (CI has no Docker engine) by the small interpolation and overlay merge
below; the same assertions run on either, and where both exist they must agree.
The end-to-end check with a real engine is deploy/compose-check.sh.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPS = PYPROJECT["project"]["dependencies"]
COMBOS = [
    ("compose.yml",),
    ("compose.yml", "compose.tls.yml"),
    ("compose.yml", "compose.tls.yml", "compose.gpu.yml"),
    ("compose.server.yml",),
    ("compose.client.yml",),
    ("compose.client.yml", "compose.client.gpu.yml"),
]
HEALTH = "127.0.0.1:39190"


def _pin(name: str) -> str:
    for dep in DEPS:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==(\S+)$", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


FLWR_VERSION = _pin("flwr")


def _common_default(var: str) -> str:
    m = re.search(rf"^{var}=\$\{{{var}:-([^}}]+)\}}$", (DEPLOY / "common.sh").read_text(), re.M)
    assert m, f"deploy/common.sh does not set a default for {var}"
    return m.group(1)


SUPERLINK_PORT = int(_common_default("SUPERLINK_PORT"))
SUPERNODE_PORT_BASE = int(_common_default("SUPERNODE_PORT_BASE"))


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory) -> Path:
    """A DEPLOY_DIR with every file the compose files name (secrets must exist for compose)."""
    root = tmp_path_factory.mktemp("deploy")
    for rel in (
        "certs/ca.crt",
        "certs/server.pem",
        "certs/server.key",
        "certs/superexec.secret",
        *(f"keys/supernode-{i}{ext}" for i in range(8) for ext in ("", ".pub")),
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    return root


def env_for(deploy_dir: Path, names: tuple[str, ...] = ()) -> dict[str, str]:
    env = {
        "DEPLOY_DIR": str(deploy_dir),
        "SUPERLINK_ADDRESS": "link.example.org",
        "PARTITION_ID": "4",
        "NUM_PARTITIONS": "7",
    }
    if "compose.server.yml" in names:
        env["SUPERLINK_BIND"] = "203.0.113.10"  # required there (a documentation address; nothing dials it)
    return env


# -- resolving compose files without an engine ------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\}|\$\{[^{}]*\})*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose-style ${VAR}, ${VAR:-default} (nested), ${VAR:?error} and $$, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return interpolate(arg, env)
        if op in (":?", "?"):
            raise KeyError(f"{name} is required: {arg}")
        return ""

    text = value.replace("$$", "\0")
    while _VAR.search(text):
        text = _VAR.sub(one, text)
    return text.replace("\0", "$")


def _merge(base: dict, overlay: dict) -> dict:
    """Compose's merge of an overlay: maps merge, command / entrypoint are replaced, lists of
    secrets / volumes / ports are joined."""
    out = dict(base)
    for key, value in overlay.items():
        if key in ("command", "entrypoint") or key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge(out[key], value)
        elif isinstance(value, list) and isinstance(out[key], list) and key in ("secrets", "volumes", "ports"):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        else:
            out[key] = value
    return out


def parsed(names: tuple[str, ...], env: dict[str, str]) -> dict:
    top: dict = {"services": {}, "volumes": {}, "secrets": {}, "networks": {}}
    for name in names:
        data = interpolate(yaml.safe_load((DEPLOY / name).read_text()), env)
        for svc_name, svc in (data.get("services") or {}).items():
            top["services"][svc_name] = _merge(top["services"].get(svc_name, {}), svc)
        for key in ("volumes", "secrets", "networks"):
            top[key].update(data.get(key) or {})
    return top


def _compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


COMPOSE = _compose_works()


@functools.cache
def _compose_config(names: tuple[str, ...], env_items: tuple) -> dict:
    args = ["docker", "compose"] + [a for n in names for a in ("-f", str(DEPLOY / n))] + ["config", "--format", "json"]
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **dict(env_items)}, timeout=120)
    assert out.returncode == 0, (names, out.stderr)
    return _unescape(json.loads(out.stdout))


def _unescape(value):
    """`docker compose config` prints $ as $$ (so that its output reads back the same)."""
    if isinstance(value, dict):
        return {k: _unescape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescape(v) for v in value]
    return value.replace("$$", "$") if isinstance(value, str) else value


def resolve(names: tuple[str, ...], env: dict[str, str]) -> dict:
    """The effective compose model: `docker compose config` where it works, else parsed here."""
    if COMPOSE:
        return _compose_config(names, tuple(sorted(env.items())))
    return parsed(names, env)


# -- one view of short and long compose syntax ---------------------------------------------------


def ports(svc: dict) -> list[tuple[str, int, int]]:
    """(host address, published port, container port) of every published port."""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip", "0.0.0.0"), int(p["published"]), int(p["target"])))
        else:
            parts = str(p).split(":")
            host = parts[0] if len(parts) == 3 else "0.0.0.0"
            out.append((host, int(parts[-2]), int(parts[-1])))
    return out


def mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only)."""
    out = {}
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = (v["source"], bool(v.get("read_only")))
        else:
            parts = v.split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def networks(svc: dict) -> dict[str, list[str]]:
    """network -> the service's extra aliases on it."""
    nets = svc.get("networks") or {"default": None}
    if isinstance(nets, list):
        return {n: [] for n in nets}
    return {n: list((cfg or {}).get("aliases") or []) for n, cfg in nets.items()}


def depends(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: cfg.get("condition", "service_started") for d, cfg in deps.items()}


def secret_files(compose: dict, svc: dict) -> dict[str, str]:
    """target path in the container -> file on the host, for a service's secrets."""
    return {s["target"]: compose["secrets"][s["source"]]["file"] for s in svc.get("secrets") or []}


def arg(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def node_config(command: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in arg(command, "--node-config").split())


def indexed(services: dict, prefix: str) -> dict[int, dict]:
    return {int(n[len(prefix) :]): s for n, s in services.items() if re.fullmatch(rf"{prefix}\d+", n)}


def _restart_is_bounded(svc: dict) -> bool:
    policy = str(svc.get("restart", "no"))
    m = re.fullmatch(r"on-failure:(\d+)", policy)
    return policy == "no" or bool(m and 1 <= int(m.group(1)) <= 5)


# -- images ------------------------------------------------------------------------------------


def test_dockerfiles_follow_flowers_suffixed_images_at_the_pinned_flwr_version():
    for name, os_tag in (("superlink", "alpine3.22"), ("supernode", "alpine3.22"), ("superexec", "ubuntu24.04")):
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert re.search(rf"^ARG FLWR_VERSION={re.escape(FLWR_VERSION)}$", text, re.M), name
        assert re.search(r"^ARG PYTHON_VERSION=3\.\d+$", text, re.M), name
        assert f"ARG BASE_OS={os_tag}" in text, name
        # Never Flower's plain tag, whose Python changes with Flower's default.
        froms = re.findall(r"^FROM (\S+)", text, re.M)
        assert froms and all(f == f"flwr/{name}:${{FLWR_VERSION}}-py${{PYTHON_VERSION}}-${{BASE_OS}}" for f in froms), (
            froms
        )
        assert f'ENTRYPOINT ["flower-{name}"]' in text
        assert "COPY docker/healthcheck.py /opt/fedpurel/healthcheck.py" in text, name
    superexec = (DOCKER / "superexec.Dockerfile").read_text()
    # Dependencies come from pyproject.toml and setup.sh (no second list of versions to drift) and are verified.
    assert "python requirements.py pyproject.toml" in superexec and "--no-deps setup.sh" in superexec
    assert "--verify /opt/fedpurel/pyproject.toml /opt/fedpurel/setup.sh" in superexec
    assert not re.search(r"torch==|peft==|open_clip_torch==|animal-mnist==", superexec), (
        "versions belong in pyproject.toml / setup.sh"
    )
    # Files that the base image's `app` user writes to are its own; no pip cache ships.
    assert "COPY --chown=app:app pyproject.toml" in superexec and "PIP_NO_CACHE_DIR=1" in superexec
    assert len(re.findall(r"^FROM ", superexec, re.M)) == 2, "a deps stage and a final stage"
    assert re.search(r"^COPY --from=deps --chown=app:app /tmp/deps/lib/", superexec, re.M)


def test_the_superexec_python_is_one_the_app_supports():
    """The image runs the app on its Python: pyproject's requires-python must allow it."""
    from packaging.specifiers import SpecifierSet

    text = (DOCKER / "superexec.Dockerfile").read_text()
    python = re.search(r"^ARG PYTHON_VERSION=(3\.\d+)$", text, re.M).group(1)
    requires = PYPROJECT["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{python}.0"), (
        f"docker/superexec.Dockerfile runs Python {python}, pyproject.toml says requires-python = {requires!r}"
    )


def test_the_superexec_image_installs_exactly_the_apps_pins():
    run = functools.partial(subprocess.run, capture_output=True, text=True)
    wanted = run(
        [sys.executable, str(DOCKER / "requirements.py"), str(REPO / "pyproject.toml")], check=True
    ).stdout.split()
    assert wanted == [d.replace(" ", "") for d in DEPS if not d.startswith("flwr")]
    for name, version in (
        ("torch", "2.14.1"),
        ("torchvision", "0.29.1"),
        ("open_clip_torch", "3.3.0"),
        ("peft", "0.21.2"),
    ):
        assert f"{name}=={version}" in wanted and _pin(name) == version
    assert FLWR_VERSION == "1.41.0"
    # The default dataset's animals: installed without deps, exactly as setup.sh does.
    no_deps = run(
        [sys.executable, str(DOCKER / "requirements.py"), "--no-deps", str(REPO / "scripts" / "setup.sh")], check=True
    ).stdout.split()
    assert no_deps == ["animal-mnist==0.4"]
    assert '--no-deps "animal-mnist==0.4"' in (REPO / "scripts" / "setup.sh").read_text()
    # The check the image build runs passes in the venv built from the same pins.
    verify = run(
        [
            str(REPO / ".venv" / "bin" / "python"),
            str(DOCKER / "requirements.py"),
            "--verify",
            str(REPO / "pyproject.toml"),
            str(REPO / "scripts" / "setup.sh"),
        ]
    )
    assert verify.returncode == 0, verify.stderr


def test_dockerignore_sends_only_what_the_dockerfiles_copy():
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert patterns[0] == "*", "everything is excluded unless listed"
    allowed = {p[1:] for p in patterns[1:] if p.startswith("!")}
    copied = set()
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        for line in re.findall(r"^COPY (?!--from)(.*)$", dockerfile.read_text(), re.M):
            words = [w for w in line.split() if not w.startswith("--")]
            copied.update(words[:-1])
    assert copied == allowed, (copied, allowed)
    for path in copied:
        assert (REPO / path).is_file(), path


@pytest.mark.parametrize("names", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_every_image_is_built_once_and_tagged_with_the_flwr_version(names, deploy_dir):
    services = resolve(names, env_for(deploy_dir, names))["services"]
    builders: dict[str, list[str]] = {}
    for name, svc in services.items():
        image = svc["image"]
        assert image.split(":")[0] in ("fedpurel/superlink", "fedpurel/supernode", "fedpurel/superexec"), image
        assert image.endswith(f":{FLWR_VERSION}"), (name, image)
        if svc.get("build"):
            builders.setdefault(image, []).append(name)
            assert svc["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION
            dockerfile = svc["build"]["dockerfile"]
            assert Path(DEPLOY / svc["build"]["context"]).resolve() == REPO and (REPO / dockerfile).is_file()
            assert dockerfile == f"docker/{image.split('/')[1].split(':')[0]}.Dockerfile"
    assert all(len(b) == 1 for b in builders.values()), f"an image built by several services: {builders}"
    assert set(builders) == {svc["image"] for svc in services.values()}, "every image is built by one service"
    # The ServerApp and the ClientApps share the one SuperExec image.
    execs = {svc["image"] for n, svc in services.items() if n.startswith("superexec")}
    assert len(execs) <= 1


# -- one host ---------------------------------------------------------------------------------


def test_one_host_compose_gives_every_node_its_partition_port_network_state_and_data(deploy_dir):
    compose = resolve(("compose.yml",), env_for(deploy_dir))
    services = compose["services"]
    nodes, apps = indexed(services, "supernode-"), indexed(services, "superexec-clientapp-")
    assert sorted(nodes) == sorted(apps) == list(range(len(nodes))) and len(nodes) >= 2
    seen: dict[str, set] = {"port": set(), "state": set(), "data": set(), "net": set()}
    for i, node in nodes.items():
        cmd = node["command"]
        cfg = node_config(cmd)
        assert cfg == {"partition-id": str(i), "num-partitions": str(len(nodes)), "state-dir": "'/app/state'"}
        assert arg(cmd, "--superlink") == f"superlink:{SUPERLINK_PORT}" and arg(cmd, "--isolation") == "process"
        port = int(arg(cmd, "--port"))
        assert port == SUPERNODE_PORT_BASE + i
        # ClientAppIo listens on the node's own network only (an alias no other network has).
        nets = networks(node)
        assert set(nets) == {"fleet", f"node-{i}"} and nets[f"node-{i}"] == [f"clientappio-{i}"]
        assert arg(cmd, "--host") == f"clientappio-{i}"
        app = apps[i]
        assert set(networks(app)) == {f"node-{i}"}, "a ClientApp SuperExec is on its node's network only"
        assert arg(app["command"], "--runtime-api-address") == f"clientappio-{i}:{port}"
        assert depends(app) == {f"supernode-{i}": "service_healthy"}
        assert depends(node) == {"superlink": "service_healthy"}
        m = mounts(app)
        assert m["/app/state"][0] in compose["volumes"] and m["/app/cache"][0] in compose["volumes"]
        assert m["/app/data"] == (f"{deploy_dir}/nodes/{i}/data", True)
        for key, value in (
            ("port", port),
            ("state", m["/app/state"][0]),
            ("data", m["/app/data"][0]),
            ("net", f"node-{i}"),
        ):
            seen[key].add(value)
    assert all(len(v) == len(nodes) for v in seen.values()), seen
    # Each node network holds exactly its node pair.
    for i in nodes:
        members = {n for n, s in services.items() if f"node-{i}" in networks(s)}
        assert members == {f"supernode-{i}", f"superexec-clientapp-{i}"}, members

    link = services["superlink"]["command"]
    assert int(arg(link, "--port")) == SUPERLINK_PORT and arg(link, "--host") == "0.0.0.0"
    assert arg(link, "--isolation") == "process" and "--disable-runtime-dependency-installation" in link
    assert arg(link, "--database").startswith("/app/state/")
    assert set(networks(services["superlink"])) == {"server", "fleet"}
    server = services["superexec-serverapp"]
    assert arg(server["command"], "--runtime-api-address") == f"superlink:{SUPERLINK_PORT}"
    assert set(networks(server)) == {"server"} and depends(server) == {"superlink": "service_healthy"}
    assert "/app/outputs" in mounts(server)
    # Only the SuperLink is published, and on loopback only unless SUPERLINK_BIND says otherwise.
    assert [n for n, s in services.items() if s.get("ports")] == ["superlink"]
    assert ports(services["superlink"]) == [("127.0.0.1", SUPERLINK_PORT, SUPERLINK_PORT)]
    bound = resolve(("compose.yml",), {**env_for(deploy_dir), "SUPERLINK_BIND": "192.0.2.7"})["services"]["superlink"]
    assert ports(bound) == [("192.0.2.7", SUPERLINK_PORT, SUPERLINK_PORT)], "SUPERLINK_BIND moves it"


@pytest.mark.parametrize("names", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_every_flower_service_is_health_checked_and_restarts_a_bounded_number_of_times(names, deploy_dir):
    services = resolve(names, env_for(deploy_dir, names))["services"]
    for name, svc in services.items():
        assert _restart_is_bounded(svc), (name, svc.get("restart"))
        if name == "register-nodes":
            assert svc["restart"] == "no"
            continue
        # The probe asks the health server the service itself starts, on container loopback.
        assert arg(svc["command"], "--health-server-address") == HEALTH, name
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "/opt/fedpurel/healthcheck.py", HEALTH], (name, test)
        if name == "superlink":
            assert test[4:] == [f"127.0.0.1:{SUPERLINK_PORT}"]
        for dep, condition in depends(svc).items():
            want = "service_completed_successfully" if dep == "register-nodes" else "service_healthy"
            assert condition == want, (name, dep, condition)


def test_the_health_probe_tells_a_grpc_server_from_a_closed_port_and_another_protocol():
    import socket
    import sys
    import threading

    from flwr.supercore.grpc_health import run_health_server_grpc_no_tls

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def probe(*addresses: str) -> int:
        return subprocess.run(
            [sys.executable, str(DOCKER / "healthcheck.py"), *addresses], capture_output=True, timeout=20
        ).returncode

    grpc_port = free_port()
    server = run_health_server_grpc_no_tls(f"127.0.0.1:{grpc_port}")
    other = socket.create_server(("127.0.0.1", 0))  # not gRPC: accepts and closes
    other.settimeout(0.2)
    stop = threading.Event()

    def serve_other():
        while not stop.is_set():
            try:
                other.accept()[0].close()
            except OSError:
                pass

    threading.Thread(target=serve_other, daemon=True).start()
    grpc_address, other_address = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{other.getsockname()[1]}"
    closed = f"127.0.0.1:{free_port()}"
    try:
        assert probe(grpc_address) == 0
        assert probe(grpc_address, other_address) == 0, "extra addresses need only accept"
        assert probe(other_address) == 1
        assert probe(closed) == 1
        assert probe(grpc_address, closed) == 1
    finally:
        stop.set()
        server.stop(None)
        other.close()


def test_the_tls_overlay_turns_on_tls_and_node_auth_for_every_connection_to_the_superlink(deploy_dir):
    env = env_for(deploy_dir)
    base = resolve(("compose.yml",), env)["services"]
    overlay = yaml.safe_load((DEPLOY / "compose.tls.yml").read_text())
    assert set(overlay["services"]) <= set(base) | {"register-nodes"}
    compose = resolve(("compose.yml", "compose.tls.yml"), env)
    services = compose["services"]
    certs = f"{deploy_dir}/certs"

    link = services["superlink"]
    cmd = link["command"]
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    files = secret_files(compose, link)
    for flag, name in (
        ("--ssl-ca-certfile", "ca.crt"),
        ("--ssl-certfile", "server.pem"),
        ("--ssl-keyfile", "server.key"),
        ("--superexec-auth-secret-file", "superexec.secret"),
    ):
        assert files[arg(cmd, flag)] == f"{certs}/{name}", flag
    # Everything but the TLS flags is the base command.
    base_cmd = base["superlink"]["command"]
    assert cmd[cmd.index("--isolation") :] == base_cmd[base_cmd.index("--isolation") :]

    server = services["superexec-serverapp"]
    assert "--insecure" not in server["command"]
    assert secret_files(compose, server)[arg(server["command"], "--root-certificates")] == f"{certs}/ca.crt"
    assert (
        secret_files(compose, server)[arg(server["command"], "--superexec-auth-secret-file")]
        == f"{certs}/superexec.secret"
    )

    nodes = indexed(services, "supernode-")
    assert sorted(nodes) == sorted(indexed(base, "supernode-"))
    for i, node in nodes.items():
        cmd = node["command"]
        assert "--insecure" not in cmd
        files = secret_files(compose, node)
        assert files[arg(cmd, "--root-certificates")] == f"{certs}/ca.crt"
        assert files[arg(cmd, "--auth-supernode-private-key")] == f"{deploy_dir}/keys/supernode-{i}"
        base_cmd = base[f"supernode-{i}"]["command"]
        for flag in ("--node-config", "--port", "--host", "--superlink", "--health-server-address"):
            assert arg(cmd, flag) == arg(base_cmd, flag), (i, flag)
        assert depends(node) == {"superlink": "service_healthy", "register-nodes": "service_completed_successfully"}
    # The private keys of different nodes never go to the same container.
    key_files = [secret_files(compose, n)["/app/keys/supernode.key"] for n in nodes.values()]
    assert len(set(key_files)) == len(nodes)

    register = services["register-nodes"]
    assert register["image"] == f"fedpurel/superlink:{FLWR_VERSION}", "the small image has the flwr CLI"
    assert mounts(register) == {"/app/keys": (f"{deploy_dir}/keys", True)}
    assert set(networks(register)) == {"server"}
    script = register["command"][0]
    assert f'address = "superlink:{SUPERLINK_PORT}"' in script and "flwr supernode register" in script
    # Every public key keys.sh made, whatever their number; no private key is read.
    assert "for pub in /app/keys/supernode-*.pub" in script and not re.search(r"supernode-\d", script)
    assert "$pub" in script and "$$" not in script, "compose's $$ escapes reach the shell as $"


def test_the_gpu_overlays_reserve_gpus_and_the_base_files_reserve_none(deploy_dir):
    env = env_for(deploy_dir)
    for names in (("compose.yml",), ("compose.client.yml",), ("compose.server.yml",)):
        for name, svc in resolve(names, env_for(deploy_dir, names))["services"].items():
            assert not (svc.get("deploy") or {}).get("resources"), f"{names[0]}: {name} reserves a device"
    base = resolve(("compose.yml",), env)["services"]
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yml").read_text())["services"]
    assert set(gpu) == {f"superexec-clientapp-{i}" for i in indexed(base, "superexec-clientapp-")}
    for overlay, service in (
        (("compose.yml", "compose.tls.yml", "compose.gpu.yml"), "superexec-clientapp-0"),
        (("compose.client.yml", "compose.client.gpu.yml"), "superexec-clientapp"),
    ):
        svc = resolve(overlay, env)["services"][service]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]


# -- server host and client hosts ------------------------------------------------------------------


def test_the_server_host_compose_is_tls_and_auth_only_and_binds_a_chosen_address(deploy_dir):
    env = env_for(deploy_dir, ("compose.server.yml",))
    compose = resolve(("compose.server.yml",), env)
    services = compose["services"]
    assert set(services) == {"superlink", "superexec-serverapp"}
    certs = f"{deploy_dir}/certs"
    link = services["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    files = secret_files(compose, services["superlink"])
    assert files[arg(link, "--ssl-certfile")] == f"{certs}/server.pem"
    assert files[arg(link, "--ssl-keyfile")] == f"{certs}/server.key"
    assert files[arg(link, "--ssl-ca-certfile")] == f"{certs}/ca.crt"
    assert ports(services["superlink"]) == [("203.0.113.10", SUPERLINK_PORT, SUPERLINK_PORT)]
    server = services["superexec-serverapp"]["command"]
    assert "--insecure" not in server and arg(server, "--runtime-api-address") == f"superlink:{SUPERLINK_PORT}"
    # The same link command as the one-host TLS overlay.
    assert link == resolve(("compose.yml", "compose.tls.yml"), env)["services"]["superlink"]["command"]
    # No default address: publishing on every interface is never implicit.
    with pytest.raises(KeyError, match="SUPERLINK_BIND"):
        parsed(("compose.server.yml",), {k: v for k, v in env.items() if k != "SUPERLINK_BIND"})


def test_a_client_host_compose_runs_one_authenticated_node(deploy_dir):
    env = env_for(deploy_dir)
    compose = resolve(("compose.client.yml",), env)
    services = compose["services"]
    assert set(services) == {"supernode", "superexec-clientapp"}
    node = services["supernode"]["command"]
    assert "--insecure" not in node
    assert arg(node, "--superlink") == f"link.example.org:{SUPERLINK_PORT}"
    assert node_config(node) == {"partition-id": "4", "num-partitions": "7", "state-dir": "'/app/state'"}
    files = secret_files(compose, services["supernode"])
    assert files[arg(node, "--root-certificates")] == f"{deploy_dir}/certs/ca.crt"
    assert files[arg(node, "--auth-supernode-private-key")] == f"{deploy_dir}/keys/supernode-4"
    app = services["superexec-clientapp"]
    assert arg(app["command"], "--runtime-api-address") == f"supernode:{arg(node, '--port')}"
    m = mounts(app)
    assert m["/app/data"] == (f"{deploy_dir}/nodes/4/data", True) and m["/app/state"][0] in compose["volumes"]
    assert not services["supernode"].get("ports") and not app.get("ports"), "a client host publishes nothing"
    # Required settings fail loudly instead of defaulting.
    for missing in ("SUPERLINK_ADDRESS", "PARTITION_ID", "NUM_PARTITIONS", "DEPLOY_DIR"):
        with pytest.raises(KeyError, match=missing):
            parsed(("compose.client.yml",), {k: v for k, v in env.items() if k != missing})


@pytest.mark.skipif(not COMPOSE, reason="no Docker Compose here: the parsed model above is the test")
@pytest.mark.parametrize("names", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_the_parsed_model_agrees_with_docker_compose_config(names, deploy_dir):
    env = env_for(deploy_dir, names)
    ours, theirs = parsed(names, env)["services"], _compose_config(names, tuple(sorted(env.items())))["services"]
    assert set(ours) == set(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.get("command") == b.get("command"), name
        assert a["image"] == b["image"] and ports(a) == ports(b) and depends(a) == depends(b), name
        assert mounts(a) == mounts(b) and networks(a) == networks(b), name
        assert a.get("healthcheck", {}).get("test") == (b.get("healthcheck") or {}).get("test"), name


# -- scripts and systemd ---------------------------------------------------------------------------


def test_scripts_ports_and_file_names_agree():
    # Ports away from the simulation's local SuperLink (39091/39093) and Flower's defaults.
    used = {SUPERLINK_PORT} | {SUPERNODE_PORT_BASE + i for i in range(16)}
    assert not used & {39091, 39093, 8000, 9094}
    certs = (DEPLOY / "certs.sh").read_text()
    for name in ("ca.crt", "server.pem", "server.key", "superexec.secret"):
        assert name in certs
    assert "IP:127.0.0.1" in certs, "the SuperLink's own SuperExec dials 127.0.0.1"
    assert "supernode-$i" in (DEPLOY / "keys.sh").read_text() and "ecdsa -b 384" in (DEPLOY / "keys.sh").read_text()
    start = (DEPLOY / "start.sh").read_text()
    for needle in (
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        '"$CERT_DIR/server.pem"',
        '"$CERT_DIR/server.key"',
        '"$CERT_DIR/ca.crt"',
        '--root-certificates "$CERT_DIR/ca.crt"',
        '--auth-supernode-private-key "$KEY_DIR/supernode-$i"',
        "$((SUPERNODE_PORT_BASE + $1))",
        "partition-id=$i num-partitions=$n",
        "state-dir='$node_dir/state'",
        "flwr supernode register",
    ):
        assert needle in start, needle
    for script in sorted(DEPLOY.glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
        assert os.access(script, os.X_OK) or script.name == "common.sh", f"{script} is not executable"


def _fake_tree(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A copy of deploy/run.sh + common.sh beside the real `fedpurel` command and a stand-in of the
    flwr CLI (which records its arguments), so run.sh runs for real without a federation."""
    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    for name in ("run.sh", "common.sh"):
        shutil.copy2(DEPLOY / name, repo / "deploy" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fedpurel").symlink_to(Path(sys.executable).parent / "fedpurel")
    calls = tmp_path / "calls"
    (bin_dir / "flwr").write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> {calls}\n'
        "case $1 in\n"
        '  run) echo "Successfully started run 42" ;;\n'
        '  ls) echo \'{"runs": [{"status": "finished:completed"}]}\' ;;\n'
        "esac\n"
    )
    (bin_dir / "flwr").chmod(0o755)
    (bin_dir / "python").symlink_to(shutil.which("python3"))
    deploy_dir = tmp_path / "deploy-dir"
    (deploy_dir / "flwr-home").mkdir(parents=True)
    (deploy_dir / "flwr-home" / "config.toml").write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DEPLOY_DIR": str(deploy_dir), "HOME": str(tmp_path)}
    return repo, calls, env


def test_run_sh_passes_output_dir_once_and_creates_nothing_on_the_cli_host(tmp_path):
    repo, calls, env = _fake_tree(tmp_path)

    def run_sh(overrides: str) -> str:
        if calls.exists():
            calls.unlink()
        out = subprocess.run(
            ["bash", str(repo / "deploy" / "run.sh"), overrides],
            env={**env, "OUTPUT_DIR": "/app/outputs"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return calls.read_text().splitlines()[0]

    # OUTPUT_DIR is a path where the ServerApp runs (a container's): passed on, not created here.
    assert run_sh("train.rounds=2").endswith("--stream --run-config output-dir='/app/outputs' train.rounds=2")
    assert not (Path(env["DEPLOY_DIR"]) / "outputs").exists()
    # An output-dir among the overrides replaces OUTPUT_DIR: the key is passed once.
    first = run_sh("output-dir='/srv/out' train.rounds=1")
    assert first.count("output-dir=") == 1 and first.endswith("--run-config output-dir='/srv/out' train.rounds=1"), (
        first
    )


def _unit(name: str) -> str:
    return (DEPLOY / "systemd" / name).read_text().replace("\\\n", " ")


def test_systemd_units_match_the_scripts():
    link = _unit("fedpurel-superlink.service")
    node = _unit("fedpurel-supernode@.service")
    assert f"SUPERLINK_PORT={SUPERLINK_PORT}" in link and f"SUPERNODE_PORT={SUPERNODE_PORT_BASE}" in node
    for flag in (
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--ssl-ca-certfile /var/lib/fedpurel/certs/ca.crt",
        "--ssl-certfile /var/lib/fedpurel/certs/server.pem",
        "--ssl-keyfile /var/lib/fedpurel/certs/server.key",
    ):
        assert flag in link
    assert "--insecure" not in link and "--insecure" not in node
    assert "--root-certificates /var/lib/fedpurel/certs/ca.crt" in node
    assert "--auth-supernode-private-key /var/lib/fedpurel/keys/supernode-%i" in node
    assert "partition-id=%i num-partitions=${NUM_PARTITIONS} state-dir='/var/lib/fedpurel/nodes/%i/state'" in node
    for unit in (link, node):
        assert "ExecStart=/opt/fedpurel/.venv/bin/flower-super" in unit
        assert "KillMode=control-group" in unit and "Restart=on-failure" in unit
        assert "ReadWritePaths=/var/lib/fedpurel" in unit and "UMask=0077" in unit
    example = (DEPLOY / "systemd" / "supernode.env.example").read_text()
    assert f"SUPERLINK_ADDRESS=superlink.example.org:{SUPERLINK_PORT}" in example


def test_every_layout_starts_a_message_within_a_tenth_of_a_second(monkeypatch):
    """The SuperExecs of the scripts, the systemd units and the images poll for new messages every
    0.1 s instead of Flower's 1 s, with a value Flower accepts."""
    from flwr.supercore.superexec.run_superexec import _get_task_poll_interval

    sources = {
        "deploy/common.sh": r"FLWR_SUPEREXEC_TASK_POLL_INTERVAL=\$\{FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-([0-9.]+)\}",
        "deploy/systemd/fedpurel-superlink.service": r"Environment=FLWR_SUPEREXEC_TASK_POLL_INTERVAL=([0-9.]+)",
        "deploy/systemd/fedpurel-supernode@.service": r"Environment=FLWR_SUPEREXEC_TASK_POLL_INTERVAL=([0-9.]+)",
        "docker/superexec.Dockerfile": r"ENV FLWR_SUPEREXEC_TASK_POLL_INTERVAL=([0-9.]+)",
    }
    for path, pattern in sources.items():
        found = re.findall(pattern, (DEPLOY.parent / path).read_text())
        assert len(found) == 1, path
        monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", found[0])
        assert _get_task_poll_interval() == 0.1, path


def test_compose_check_uses_the_namespaced_run_config_and_cleans_up():
    text = (DEPLOY / "compose-check.sh").read_text()
    runs = re.findall(r'^RUN_[ABC]="([^"]+)"$', text, re.M)
    assert len(runs) == 3
    for run in runs:
        for key in (item.split("=", 1)[0] for item in run.split()):
            assert "." in key or key in ("seed", "eval-every", "output-dir", "round-timeout", "resume-from"), key
    assert "trap cleanup EXIT" in text and "down -v --remove-orphans" in text
    assert "SUPERLINK_BIND=127.0.0.1" in text
