"""`fedpurel stage` (fedpurel_cli/stage.py): `flwr run` on the staged copy ships the FAB that `flwr run .` ships."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedpurel_cli import stage as stage_module

ROOT = Path(__file__).resolve().parent.parent


def fedpurel_stage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpurel_cli.main", "stage", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_staged_copy_builds_the_same_fab_byte_for_byte(tmp_path):
    out = fedpurel_stage(str(tmp_path / "app"))
    assert out.returncode == 0, out.stderr
    staged = Path(out.stdout.strip())
    assert staged == tmp_path / "app"
    fab = build_fab_from_disk(staged)
    assert fab == build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert "fedpurel_app/tkl.py" in names and "client_app/app.py" in names and "server_app/app.py" in names
    assert "fedpurel_app/plan.py" in names and "fedpurel_app/registry.py" in names
    assert not any(
        name.startswith(("tests/", "bench/", "deploy/", "scripts/", ".venv/", "fedpurel_cli/")) for name in names
    ), "the command-line tools and the tests are not part of the FAB"
    assert not list(staged.rglob("__pycache__"))


def test_staging_refuses_an_existing_folder(tmp_path):
    out = fedpurel_stage(str(tmp_path))
    assert out.returncode != 0
    assert "already exists" in out.stderr and "Traceback" not in out.stderr
    usage = fedpurel_stage()
    assert usage.returncode != 0 and "usage: fedpurel stage DEST" in usage.stderr


def test_a_fab_include_pattern_it_cannot_copy_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.flwr.app]\nfab-include = ["pkg/**", "src/*.py"]\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("")
    monkeypatch.setattr(stage_module, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="'src/\\*.py' is not a folder/\\*\\* or a /file"):
        stage_module.stage(tmp_path / "out")
    assert (tmp_path / "out" / "pkg" / "a.py").is_file()  # what it could copy, it copied
