"""Copy the Flower app's own files into a folder, for `flwr run <folder>`.

`flwr run .` lists every file below the app folder before it filters them
with `fab-exclude` and `.gitignore`; with `.venv` at the repository root that
walk visits ~55,000 files and takes 5 s of every run. The copy holds what the
FAB ships, read from `fab-include` in `pyproject.toml` (folders `name/**` and
root files `/name`), and `pyproject.toml`, so the FAB built from it is byte for
byte the one `flwr run .` builds, in a fraction of a second.

    fedpurel stage DEST    # DEST must not exist yet
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage(dest: Path) -> Path:
    """Copy what ``fab-include`` names, and ``pyproject.toml``, into ``dest`` (created; it must not exist)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["flwr"]["app"]["fab-include"]
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for pattern in patterns:
        name = pattern.lstrip("/").removesuffix("/**")
        if any(c in name for c in "*?[") or not (ROOT / name).exists():
            raise SystemExit(f"stage: fab-include pattern {pattern!r} is not a folder/** or a /file of this app")
        if name != pattern.lstrip("/"):
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, dest / name)
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: fedpurel stage DEST")
    dest = Path(argv[0])
    if dest.exists():
        raise SystemExit(f"stage: {dest} already exists; give a folder that does not exist yet")
    print(stage(dest))
    return 0
