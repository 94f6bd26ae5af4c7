"""The app's runtime requirements for the SuperExec image, from pyproject.toml.

    python requirements.py pyproject.toml            # print [project].dependencies minus flwr
    python requirements.py --verify pyproject.toml   # check the installed versions against the pins

The flwr pin is not printed (the flwr/superexec base image provides flwr); --verify
checks that the base image's flwr is the pinned one, so that an image built from a
mismatched base fails at build time, not at the first run.
"""

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version

PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*$")


def dependencies(path: str) -> list[str]:
    with open(path, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def name_of(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def main(argv: list[str]) -> int:
    verify = argv[:1] == ["--verify"]
    deps = dependencies(argv[-1])
    if not verify:
        print("\n".join(d for d in deps if name_of(d) != "flwr"))
        return 0
    errors = []
    for requirement in deps:
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
            errors.append(f"{name}: installed {installed}, pyproject.toml pins {pinned}")
    for line in errors:
        print(f"requirements: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
