"""The run summary table: grouping by method, mean ± std over seeds, zero-shot row."""

import json

from fedpurel_app.report import load_runs, main, table


def fake_run(folder, align, seed, gm_all, pm_all):
    gm = {"all": gm_all, "many": 0.9, "medium": 0.5, "few": 0.25, "balancedness": 0.1}
    data = {
        "config": {"align": align, "peft": "prompt", "personalization": "post", "seed": seed},
        "zero_shot": {"gm": {**gm, "all": 0.5}, "pm": {"all": 0.55}},
        "final": {"gm": gm, "pm": {"all": pm_all}, "wall_time": 10.0 + seed},
        "rounds": [],
    }
    path = folder / f"{align}-{seed}"
    path.mkdir()
    (path / "results.json").write_text(json.dumps(data))


def test_table_groups_methods_and_averages_seeds(tmp_path):
    fake_run(tmp_path, "tkl", 0, 0.70, 0.80)
    fake_run(tmp_path, "tkl", 1, 0.80, 0.90)
    fake_run(tmp_path, "none", 0, 0.60, 0.70)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "results.json").write_text(json.dumps({"config": {}, "final": {}}))
    runs = load_runs(tmp_path)
    assert len(runs) == 3
    lines = table(runs).splitlines()
    tkl = next(line for line in lines if line.startswith("| fedpurel (tkl)"))
    assert "| 0,1 |" in tkl and "75.0 ± 5.0" in tkl and "85.0 ± 5.0" in tkl and "10.5 ± 0.5" in tkl
    none = next(line for line in lines if line.startswith("| promptfl"))
    assert "| 60.0 |" in none
    zero = next(line for line in lines if line.startswith("| zero-shot"))
    assert "50.0 ± 0.0" in zero and "55.0 ± 0.0" in zero


def test_cli_reports_an_empty_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err
