"""The deployment files agree with each other and with pyproject.toml.

Parsed checks on deploy/compose*.yml, docker/*.Dockerfile, deploy/systemd/* and the
deploy/ scripts: image tags and the flwr version match the app's pin; every SuperNode
has its own partition-id, port, state, data and key; TLS material has the names
deploy/certs.sh and deploy/keys.sh write; ports agree with deploy/common.sh.
`docker compose config` runs in addition only where a compose plugin works (not on
machines without a Docker engine); the parsed checks run everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPS = PYPROJECT["project"]["dependencies"]


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
TEST_ENV = {"DEPLOY_DIR": "/srv/fed", "SUPERLINK_ADDRESS": "link.example.org", "PARTITION_ID": "4",
            "NUM_PARTITIONS": "7"}

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


def load(name: str, env: dict[str, str] | None = None) -> dict:
    data = yaml.safe_load((DEPLOY / name).read_text())
    return interpolate(data, TEST_ENV if env is None else env)


def merge(base: dict, overlay: dict) -> dict:
    """Compose's merge of an overlay: maps merge, command / entrypoint are replaced."""
    out = dict(base)
    for key, value in overlay.items():
        if key in ("command", "entrypoint") or key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, list) and isinstance(out[key], list) and key in ("secrets", "volumes", "ports"):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        else:
            out[key] = value
    return out


def merged(*names: str) -> dict:
    files = [load(n) for n in names]
    services: dict = {}
    top = {"volumes": {}, "secrets": {}}
    for f in files:
        for name, svc in (f.get("services") or {}).items():
            services[name] = merge(services.get(name, {}), svc)
        for key in top:
            top[key].update(f.get(key) or {})
    return {"services": services, **top}


def arg(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def node_config(command: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in arg(command, "--node-config").split())


def secret_files(compose: dict, service: dict) -> dict[str, str]:
    """target path in the container -> file on the host, for a service's secrets."""
    return {s["target"]: compose["secrets"][s["source"]]["file"] for s in service.get("secrets", [])}


def indexed(services: dict, prefix: str) -> dict[int, dict]:
    return {int(n[len(prefix):]): s for n, s in services.items() if re.fullmatch(rf"{prefix}\d+", n)}


# -- pins and images --------------------------------------------------------------------------


def test_dockerfiles_follow_flowers_images_at_the_pinned_flwr_version():
    for name, component in (("superlink", "superlink"), ("supernode", "supernode"), ("superexec", "superexec")):
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert re.search(rf"^ARG FLWR_VERSION={re.escape(FLWR_VERSION)}$", text, re.M), name
        assert re.search(rf"^FROM flwr/{component}:\$\{{FLWR_VERSION\}}$", text, re.M), name
    superexec = (DOCKER / "superexec.Dockerfile").read_text()
    # Dependencies come from pyproject.toml (no second list of versions to drift) and are verified.
    assert "COPY pyproject.toml" in superexec and "requirements.py /tmp/fedpurel/pyproject.toml" in superexec
    assert "--verify" in superexec and "pip check" in superexec
    assert not re.search(r"torch==|peft==|open_clip_torch==", superexec), "versions belong in pyproject.toml"
    assert 'ENTRYPOINT ["flower-superexec"]' in superexec


def test_the_superexec_image_installs_exactly_the_apps_pins():
    proc = subprocess.run(
        ["python", str(DOCKER / "requirements.py"), str(REPO / "pyproject.toml")],
        capture_output=True, text=True, check=True,
    )
    wanted = proc.stdout.split()
    assert wanted == [d.replace(" ", "") for d in DEPS if not d.startswith("flwr")]
    for name, version in (("torch", "2.14.1"), ("torchvision", "0.29.1"), ("open_clip_torch", "3.3.0"),
                          ("peft", "0.21.2")):
        assert f"{name}=={version}" in wanted and _pin(name) == version
    assert FLWR_VERSION == "1.41.0"
    # The check the image build runs passes in the venv built from the same pins.
    verify = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(DOCKER / "requirements.py"), "--verify",
                             str(REPO / "pyproject.toml")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


@pytest.mark.parametrize("name", ["compose.yml", "compose.tls.yml", "compose.server.yml", "compose.client.yml"])
def test_every_image_is_tagged_with_the_flwr_version(name):
    for service, svc in load(name)["services"].items():
        if "image" in svc:
            assert svc["image"].endswith(f":{FLWR_VERSION}"), (service, svc["image"])
            assert svc["image"].split(":")[0] in (
                "fedpurel/superlink", "fedpurel/supernode", "fedpurel/superexec", "fedpurel/superexec-cpu"
            ), svc["image"]
        if "build" in svc:
            assert svc["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION
            assert (REPO / svc["build"]["dockerfile"]).is_file()
            assert Path(DEPLOY / svc["build"]["context"]).resolve() == REPO


# -- one host ---------------------------------------------------------------------------------


def test_one_host_compose_gives_every_supernode_its_own_partition_port_state_and_data():
    compose = load("compose.yml")
    services = compose["services"]
    nodes, apps = indexed(services, "supernode-"), indexed(services, "superexec-clientapp-")
    assert sorted(nodes) == sorted(apps) == list(range(len(nodes))) and len(nodes) >= 2
    partitions, ports, states, datas = set(), set(), set(), set()
    for i, node in nodes.items():
        cmd = node["command"]
        cfg = node_config(cmd)
        assert cfg["partition-id"] == str(i) and cfg["num-partitions"] == str(len(nodes))
        assert cfg["state-dir"] == "'/app/state'"
        assert arg(cmd, "--superlink") == f"superlink:{SUPERLINK_PORT}"
        assert arg(cmd, "--isolation") == "process"
        port = int(arg(cmd, "--port"))
        assert port == SUPERNODE_PORT_BASE + i
        partitions.add(cfg["partition-id"])
        ports.add(port)
        # Its ClientApp SuperExec dials exactly this SuperNode and holds this node's volumes.
        app = apps[i]
        assert arg(app["command"], "--runtime-api-address") == f"supernode-{i}:{port}"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in app["volumes"]}
        assert mounts["/app/state"] in compose["volumes"], "state is a named (persistent) volume"
        assert mounts["/app/data"] == f"{TEST_ENV['DEPLOY_DIR']}/nodes/{i}/data"
        assert mounts["/app/cache"] in compose["volumes"]
        states.add(mounts["/app/state"])
        datas.add(mounts["/app/data"])
        assert node["depends_on"]["superlink"]["condition"] == "service_started"
    assert len(partitions) == len(ports) == len(states) == len(datas) == len(nodes)

    link = services["superlink"]["command"]
    assert int(arg(link, "--port")) == SUPERLINK_PORT and arg(link, "--host") == "0.0.0.0"
    assert arg(link, "--isolation") == "process" and "--disable-runtime-dependency-installation" in link
    assert arg(link, "--database").startswith("/app/state/")
    assert services["superlink"]["ports"] == [f"{SUPERLINK_PORT}:{SUPERLINK_PORT}"]
    server = services["superexec-serverapp"]
    assert arg(server["command"], "--runtime-api-address") == f"superlink:{SUPERLINK_PORT}"
    assert any(v.endswith(":/app/outputs") for v in server["volumes"])
    # Only the SuperLink is published.
    assert [n for n, s in services.items() if s.get("ports")] == ["superlink"]


def test_the_tls_overlay_turns_on_tls_and_node_auth_for_every_connection_to_the_superlink():
    base = load("compose.yml")["services"]
    overlay = load("compose.tls.yml")
    assert set(overlay["services"]) <= set(base) | {"register-nodes"}
    compose = merged("compose.yml", "compose.tls.yml")
    services = compose["services"]
    certs = f"{TEST_ENV['DEPLOY_DIR']}/certs"

    link = services["superlink"]
    cmd = link["command"]
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    files = secret_files(compose, link)
    for flag, name in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "server.pem"), ("--ssl-keyfile", "server.key"),
                       ("--superexec-auth-secret-file", "superexec.secret")):
        assert files[arg(cmd, flag)] == f"{certs}/{name}", flag
    assert int(arg(cmd, "--port")) == SUPERLINK_PORT
    # Everything but the TLS flags is the base command.
    assert cmd[cmd.index("--isolation"):] == base["superlink"]["command"][base["superlink"]["command"].index("--isolation"):]

    server = services["superexec-serverapp"]
    assert "--insecure" not in server["command"]
    assert secret_files(compose, server)[arg(server["command"], "--root-certificates")] == f"{certs}/ca.crt"
    assert secret_files(compose, server)[arg(server["command"], "--superexec-auth-secret-file")] == f"{certs}/superexec.secret"

    nodes = indexed(services, "supernode-")
    pubs = set()
    for i, node in nodes.items():
        cmd = node["command"]
        assert "--insecure" not in cmd
        files = secret_files(compose, node)
        assert files[arg(cmd, "--root-certificates")] == f"{certs}/ca.crt"
        assert files[arg(cmd, "--auth-supernode-private-key")] == f"{TEST_ENV['DEPLOY_DIR']}/keys/supernode-{i}"
        assert node_config(cmd) == node_config(base[f"supernode-{i}"]["command"]), "the overlay keeps the partition"
        assert arg(cmd, "--port") == arg(base[f"supernode-{i}"]["command"], "--port")
        assert node["depends_on"]["register-nodes"]["condition"] == "service_completed_successfully"
        pubs.add(f"{TEST_ENV['DEPLOY_DIR']}/keys/supernode-{i}.pub:/app/keys/supernode-{i}.pub:ro")
    register = services["register-nodes"]
    assert set(register["volumes"]) == pubs, "every node's public key is registered, and no private key is mounted"
    script = register["command"][0]
    assert f'address = "superlink:{SUPERLINK_PORT}"' in script and "flwr supernode register" in script
    assert "$pub" in script and "$$" not in script, "compose's $$ escapes reach the shell as $"
    # The private keys of different nodes never go to the same container.
    key_sources = [s["source"] for n in nodes.values() for s in n["secrets"] if s["target"] == "/app/keys/supernode.key"]
    assert len(set(key_sources)) == len(nodes)


def test_the_gpu_overlay_reserves_a_gpu_for_each_clientapp():
    base = load("compose.yml")["services"]
    gpu = load("compose.gpu.yml")["services"]
    assert set(gpu) == {f"superexec-clientapp-{i}" for i in indexed(base, "superexec-clientapp-")}
    for svc in gpu.values():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]


# -- server host and client hosts ------------------------------------------------------------------


def test_the_server_host_compose_is_tls_and_auth_only():
    compose = load("compose.server.yml")
    services = compose["services"]
    assert set(services) == {"superlink", "superexec-serverapp"}
    certs = f"{TEST_ENV['DEPLOY_DIR']}/certs"
    link = services["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert int(arg(link, "--port")) == SUPERLINK_PORT and arg(link, "--host") == "0.0.0.0"
    files = secret_files(compose, services["superlink"])
    assert files[arg(link, "--ssl-certfile")] == f"{certs}/server.pem"
    assert files[arg(link, "--ssl-keyfile")] == f"{certs}/server.key"
    assert files[arg(link, "--ssl-ca-certfile")] == f"{certs}/ca.crt"
    assert services["superlink"]["ports"] == [f"{SUPERLINK_PORT}:{SUPERLINK_PORT}"]
    server = services["superexec-serverapp"]["command"]
    assert "--insecure" not in server and arg(server, "--runtime-api-address") == f"superlink:{SUPERLINK_PORT}"
    # The same link command as the one-host TLS overlay.
    assert link == merged("compose.yml", "compose.tls.yml")["services"]["superlink"]["command"]


def test_a_client_host_compose_runs_one_authenticated_node_on_its_gpu():
    compose = load("compose.client.yml")
    services = compose["services"]
    assert set(services) == {"supernode", "superexec-clientapp"}
    node = services["supernode"]["command"]
    assert "--insecure" not in node
    assert arg(node, "--superlink") == f"link.example.org:{SUPERLINK_PORT}"
    assert node_config(node) == {"partition-id": "4", "num-partitions": "7", "state-dir": "'/app/state'"}
    files = secret_files(compose, services["supernode"])
    assert files[arg(node, "--root-certificates")] == "/srv/fed/certs/ca.crt"
    assert files[arg(node, "--auth-supernode-private-key")] == "/srv/fed/keys/supernode-4"
    app = services["superexec-clientapp"]
    assert arg(app["command"], "--runtime-api-address") == f"supernode:{arg(node, '--port')}"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in app["volumes"]}
    assert mounts["/app/data"] == "/srv/fed/nodes/4/data" and mounts["/app/state"] in compose["volumes"]
    (device,) = app["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert not services["supernode"].get("ports"), "a client host publishes nothing"
    # Required settings fail loudly instead of defaulting.
    for missing in ("SUPERLINK_ADDRESS", "PARTITION_ID", "NUM_PARTITIONS", "DEPLOY_DIR"):
        with pytest.raises(KeyError, match=missing):
            load("compose.client.yml", {k: v for k, v in TEST_ENV.items() if k != missing})


# -- scripts and systemd ---------------------------------------------------------------------------


def test_scripts_ports_and_file_names_agree():
    # Ports away from the simulation's local SuperLink (39091/39093) and Flower's defaults.
    used = {SUPERLINK_PORT} | {SUPERNODE_PORT_BASE + i for i in range(16)}
    assert not used & {39091, 39093, 8000, 9094}
    certs = (DEPLOY / "certs.sh").read_text()
    for name in ("ca.crt", "server.pem", "server.key", "superexec.secret"):
        assert name in certs
    assert "IP:127.0.0.1" in certs, "the SuperLink's own SuperExec dials 127.0.0.1"
    assert 'supernode-$i' in (DEPLOY / "keys.sh").read_text() and "ecdsa -b 384" in (DEPLOY / "keys.sh").read_text()
    start = (DEPLOY / "start.sh").read_text()
    for needle in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", '"$CERT_DIR/server.pem"',
                   '"$CERT_DIR/server.key"', '"$CERT_DIR/ca.crt"', '--root-certificates "$CERT_DIR/ca.crt"',
                   '--auth-supernode-private-key "$KEY_DIR/supernode-$i"', "$((SUPERNODE_PORT_BASE + $1))", "partition-id=$i num-partitions=$n",
                   "state-dir='$node_dir/state'", "flwr supernode register"):
        assert needle in start, needle
    for script in sorted(DEPLOY.glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
        assert os.access(script, os.X_OK) or script.name == "common.sh", f"{script} is not executable"


def _unit(name: str) -> str:
    return (DEPLOY / "systemd" / name).read_text().replace("\\\n", " ")


def test_systemd_units_match_the_scripts():
    link = _unit("fedpurel-superlink.service")
    node = _unit("fedpurel-supernode@.service")
    assert f"SUPERLINK_PORT={SUPERLINK_PORT}" in link and f"SUPERNODE_PORT={SUPERNODE_PORT_BASE}" in node
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation",
                 "--ssl-ca-certfile /var/lib/fedpurel/certs/ca.crt", "--ssl-certfile /var/lib/fedpurel/certs/server.pem",
                 "--ssl-keyfile /var/lib/fedpurel/certs/server.key"):
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


# -- docker compose itself, where it exists -------------------------------------------------------------


def _compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_compose_files_resolve(tmp_path):
    """Every file combination parses and interpolates (parsed here; `docker compose config` too where it works)."""
    deploy_dir = tmp_path / "deploy"
    for rel in ("certs/ca.crt", "certs/server.pem", "certs/server.key", "certs/superexec.secret",
                *(f"keys/supernode-{i}{ext}" for i in range(8) for ext in ("", ".pub"))):
        (deploy_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (deploy_dir / rel).write_text("x")
    env = {**TEST_ENV, "DEPLOY_DIR": str(deploy_dir)}
    combos = [["compose.yml"], ["compose.yml", "compose.tls.yml"], ["compose.yml", "compose.tls.yml", "compose.gpu.yml"],
              ["compose.server.yml"], ["compose.client.yml"]]
    for combo in combos:
        for name in combo:
            data = load(name, env)
            assert isinstance(data.get("services"), dict) and data["services"], name
            for secret in (data.get("secrets") or {}).values():
                assert Path(secret["file"]).is_file(), secret["file"]
    if not _compose_works():
        return  # no Docker Compose here: the parsed checks above and in this module are the test
    for combo in combos:
        args = ["docker", "compose"] + [a for name in combo for a in ("-f", str(DEPLOY / name))] + ["config", "-q"]
        out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
        assert out.returncode == 0, (combo, out.stderr)
