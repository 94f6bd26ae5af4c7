"""The run summary table: grouping by method, mean ± std over seeds, zero-shot row."""

import json

from fedpurel_cli.report import METHODS, csv_rows, load_runs, run_method, table
from fedpurel_cli.reporting import main


def fake_run(folder, method, seed, gm_all, pm_all, *, in_results=False, reports=None, suffix=""):
    """A finished results.json; the method is named in its flat config (as cfg.to_flower() writes it)
    or, with ``in_results``, only in results.json's ``method`` entry."""
    gm = {"all": gm_all, "many": 0.9, "medium": 0.5, "few": 0.25, "balancedness": 0.1}
    config = {"peft.name": "prompt", "seed": seed}
    if not in_results:
        config["method.name"] = method
    data = {
        "config": config,
        "zero_shot": {"gm": {**gm, "all": 0.5}, "pm": {"all": 0.55}},
        "final": {"gm": gm, "pm": {"all": pm_all}, "wall_time": 10.0 + seed},
        "rounds": [],
    }
    if in_results or reports:
        data["method"] = {"name": method, **({"reports": reports} if reports else {})}
    path = folder / f"{method}-{seed}{suffix}"
    path.mkdir()
    (path / "results.json").write_text(json.dumps(data))


def test_table_groups_methods_and_averages_seeds(tmp_path):
    fake_run(tmp_path, "fedpurel", 0, 0.70, 0.80)
    fake_run(tmp_path, "fedpurel", 1, 0.80, 0.90, in_results=True)
    fake_run(tmp_path, "promptfl", 0, 0.60, 0.70, reports=["gm"])
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "results.json").write_text(json.dumps({"config": {}, "final": {}}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    runs = load_runs(tmp_path)
    assert len(runs) == 3
    assert sorted(run_method(run) for run in runs) == ["fedpurel", "fedpurel", "promptfl"]
    lines = table(runs).splitlines()
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert rows == ["zero-shot CLIP", "promptfl", "fedpurel"], "zero-shot first, then the registry's order"
    fedpurel = next(line for line in lines if line.startswith("| fedpurel |"))
    assert "| 0,1 |" in fedpurel and "75.0 ± 5.0" in fedpurel and "85.0 ± 5.0" in fedpurel
    assert "10.5 ± 0.5" in fedpurel
    promptfl = next(line for line in lines if line.startswith("| promptfl |"))
    assert "| 60.0 |" in promptfl and "| – |" in promptfl, "PM is not reported by a global method"
    zero = next(line for line in lines if line.startswith("| zero-shot"))
    assert "50.0 ± 0.0" in zero and "55.0 ± 0.0" in zero


def test_runs_of_one_seed_are_averaged_before_the_seeds(tmp_path):
    fake_run(tmp_path, "fedpurel", 0, 0.60, 0.80)
    fake_run(tmp_path, "fedpurel", 0, 0.80, 0.80, suffix="-again")
    fake_run(tmp_path, "fedpurel", 1, 0.90, 0.80)
    mean = next(row for row in csv_rows(load_runs(tmp_path)) if row["method"] == "fedpurel")
    assert mean["n_seeds"] == "2" and mean["gm_all"] == "80.0000" and mean["gm_all_std"] == "10.0000"


def test_the_methods_are_the_registrys():
    from fedpurel_app.registry import METHODS as REGISTRY

    assert METHODS == REGISTRY.names() and "fedpurel" in METHODS


def test_cli_reports_an_empty_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_cli_prints_the_table(tmp_path, capsys):
    fake_run(tmp_path, "promptfl-la", 0, 0.60, 0.70)
    assert main([str(tmp_path)]) == 0
    assert "| promptfl-la | 0 | 1 |" in capsys.readouterr().out
