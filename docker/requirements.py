"""The app's runtime requirements for the SuperExec image, from pyproject.toml and scripts/setup.sh.

    python requirements.py pyproject.toml              # [project].dependencies minus flwr
    python requirements.py --no-deps scripts/setup.sh  # the data-only pins setup.sh installs with --no-deps
    python requirements.py --verify pyproject.toml scripts/setup.sh
        # in the built image: every pin installed at its version, `pip check` clean apart
        # from the dependencies the --no-deps packages deliberately lack, and no package
        # installed twice (a second copy would shadow or be shadowed by the base image's)

The flwr pin is not printed (the flwr/superexec base image provides flwr); --verify
checks that the base image's flwr is the pinned one, so that an image built from a
mismatched base fails at build time, not at the first run.

The --no-deps packages carry data only (animal-mnist: the animal silhouettes of the
default dataset); their own loaders' dependencies (tensorflow) are not needed. Their
pins live in scripts/setup.sh, which installs the development venv the same way.
"""

import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distributions, version

PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*$")
# `pip install ... --no-deps "name==1.2"` lines of scripts/setup.sh
NO_DEPS_LINE = re.compile(r"pip install\b[^\n]*--no-deps\b([^\n]*)")
QUOTED_PIN = re.compile(r"""["']?([A-Za-z0-9_.-]+==[^\s"']+)["']?""")
# `pip check`: "animal-mnist 0.4 requires tensorflow, which is not installed."
NOT_INSTALLED = re.compile(r"^(\S+) \S+ requires (\S+), which is not installed\.$")


def dependencies(path: str) -> list[str]:
    with open(path, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def no_deps_pins(setup_sh: str) -> list[str]:
    with open(setup_sh) as f:
        text = f.read()
    pins = [p for line in NO_DEPS_LINE.findall(text) for p in QUOTED_PIN.findall(line)]
    if not pins:
        raise SystemExit(f"requirements: no `pip install --no-deps name==version` line in {setup_sh}")
    return pins


def name_of(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def version_errors(requirements: list[str]) -> list[str]:
    errors = []
    for requirement in requirements:
        match = PIN.match(requirement)
        if not match:
            continue  # ranges are left to pip's resolver (and `pip check`)
        name, pinned = match.groups()
        try:
            installed = version(name)
        except PackageNotFoundError:
            errors.append(f"{name}: not installed (pinned {pinned})")
            continue
        if installed.split("+")[0] != pinned:
            errors.append(f"{name}: installed {installed}, pins say {pinned}")
    return errors


def pip_check_errors(no_deps: list[str]) -> list[str]:
    """`pip check`'s complaints, less "X requires Y, which is not installed" for the --no-deps X."""
    skip = {name_of(p) for p in no_deps}
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    errors = []
    for line in (out.stdout + out.stderr).splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        m = NOT_INSTALLED.match(line)
        if m and name_of(m.group(1)) in skip:
            continue
        errors.append(f"pip check: {line}")
    return errors


def duplicate_errors() -> list[str]:
    seen: dict[str, str] = {}
    errors = []
    for dist in distributions():
        name = name_of(dist.metadata["Name"] or "")
        where = str(dist.locate_file(""))
        if name in seen:
            errors.append(f"{name}: installed twice ({seen[name]} and {dist.version} in {where})")
        seen.setdefault(name, f"{dist.version} in {where}")
    return errors


def main(argv: list[str]) -> int:
    if argv[:1] == ["--no-deps"] and len(argv) == 2:
        print("\n".join(no_deps_pins(argv[1])))
        return 0
    if argv[:1] == ["--verify"] and len(argv) == 3:
        no_deps = no_deps_pins(argv[2])
        errors = version_errors(dependencies(argv[1]) + no_deps) + pip_check_errors(no_deps) + duplicate_errors()
        for line in errors:
            print(f"requirements: {line}", file=sys.stderr)
        return 1 if errors else 0
    if len(argv) == 1 and not argv[0].startswith("-"):
        print("\n".join(d for d in dependencies(argv[0]) if name_of(d) != "flwr"))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
