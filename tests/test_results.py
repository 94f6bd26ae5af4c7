"""results.json: final metrics, means over the last 10 evaluations, the printed table."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedpurel_app.results import RunRecorder, new_run_dir


def gm(value: float) -> dict:
    return {"all": value, "many": value, "medium": value, "few": value / 2, "balancedness": value / 4}


def test_final_and_last10_are_computed_from_the_recorded_rounds(tmp_path):
    run_dir = new_run_dir(tmp_path, "x")
    recorder = RunRecorder(run_dir, {"seed": 0})
    recorder.zero_shot(gm(0.5), {"all": 0.55})
    for rnd in range(1, 13):  # 12 GM evaluations: the last 10 are rounds 3..12
        recorder.add_round(rnd, "global", gm=gm(rnd / 100), train={"conflict-rate": 0.5})
    recorder.add_round(13, "personal", pm={"all": 0.9, "all_weighted": 0.8})
    final = recorder.finish({"ctx": torch.ones(2, 3)})

    data = json.loads((run_dir / "results.json").read_text())
    assert data["final"] == final
    assert final["gm"]["all"] == pytest.approx(0.12)
    assert final["gm_last10"]["all"] == pytest.approx(sum(range(3, 13)) / 10 / 100)
    assert final["gm_last10"]["few"] == pytest.approx(sum(range(3, 13)) / 10 / 200)
    assert final["pm"]["all"] == 0.9
    assert [r["round"] for r in data["rounds"]] == list(range(1, 14))
    assert torch.equal(load_file(str(run_dir / "phi_g.safetensors"))["ctx"], torch.ones(2, 3))
    table = recorder.table()
    assert "zero-shot" in table and "50.00" in table and "55.00" in table and "90.00" in table
    assert not list(run_dir.glob(".*.tmp")), "a temporary file was left behind"


def test_run_dirs_never_collide(tmp_path):
    first, second = new_run_dir(tmp_path, "same"), new_run_dir(tmp_path, "same")
    assert first != second and first.is_dir() and second.is_dir()


def test_the_config_is_recorded_flat_and_parses_back(tmp_path):
    from fedpurel_cli.report import method_name
    from tests.conftest import make_cfg

    cfg = make_cfg({"method.name": "promptfl-la", "method.promptfl-la.tau": 0.5, "seed": 4})
    run_dir = new_run_dir(tmp_path, "x")
    RunRecorder(run_dir, cfg.to_flower()).save()
    config = json.loads((run_dir / "results.json").read_text())["config"]
    assert config["method.name"] == "promptfl-la" and config["method.promptfl-la.tau"] == 0.5 and config["seed"] == 4
    assert method_name(config) == "promptfl-la"
    assert make_cfg(config).to_flower() == cfg.to_flower(), "results.json's config reproduces the run's"
