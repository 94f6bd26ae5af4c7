"""scripts/stage_app.py: `flwr run` on the staged copy ships the FAB that `flwr run .` ships."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parent.parent


def test_staged_copy_builds_the_same_fab_byte_for_byte(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/stage_app.py", str(tmp_path / "app")], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    staged = Path(out.stdout.strip())
    assert staged == tmp_path / "app"
    fab = build_fab_from_disk(staged)
    assert fab == build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert "fedpurel_app/tkl.py" in names and "client_app/app.py" in names and "server_app/app.py" in names
    assert not any(name.startswith(("tests/", "bench/", "deploy/", "scripts/", ".venv/")) for name in names)
    assert not list(staged.rglob("__pycache__"))


def test_staging_refuses_an_existing_folder(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/stage_app.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "already exists" in out.stderr and "Traceback" not in out.stderr
