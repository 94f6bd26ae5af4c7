"""Copy the Flower app's own files into a folder, for `flwr run <folder>`.

`flwr run .` lists every file below the app folder before it filters them
with `fab-exclude` and `.gitignore`; with `.venv` at the repository root that
walk visits ~55,000 files and takes 5 s of every run. The copy holds what the
FAB ships (`fab-include` in `pyproject.toml`: the wheel's packages, `README.md`,
`LICENSE`) and `pyproject.toml`, so the FAB built from it is byte for byte the
one `flwr run .` builds, in a fraction of a second.

    python scripts/stage_app.py DEST    # DEST must not exist yet
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("pyproject.toml", "README.md", "LICENSE")


def stage(dest: Path) -> Path:
    """Copy the app into ``dest`` (created; it must not exist) and return it."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "packages"
    ]
    dest.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(ROOT / name, dest / name)
    for package in packages:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/stage_app.py DEST")
    dest = Path(sys.argv[1])
    if dest.exists():
        raise SystemExit(f"stage_app: {dest} already exists; give a folder that does not exist yet")
    print(stage(dest))
