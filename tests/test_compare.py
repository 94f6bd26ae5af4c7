"""The comparison runner (with a fake run command) and its report: table, CSV and PNG plots."""

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedpurel_cli import compare
from fedpurel_cli.plots import PLOT_FILES
from fedpurel_cli.report import load_runs, table
from fedpurel_cli.reporting import main as report_main
from fedpurel_cli.reporting import write_report

FAKE_RUN = [sys.executable, str(Path(__file__).with_name("fake_run.py"))]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fake_log(tmp_path, monkeypatch):
    """The fake run command's call log (one list of arguments per call)."""
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_RUN_LOG", str(path))
    monkeypatch.delenv("FAKE_RUN_FAIL", raising=False)
    return path


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def job_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[")]


def compare_main(out: Path, *args: str) -> int:
    return compare.main(["--out", str(out), *args], run_command=FAKE_RUN)


# --- the runner -------------------------------------------------------------------------------


def test_runs_every_job_in_its_folder_and_writes_the_report(tmp_path, fake_log, capsys):
    out = tmp_path / "cmp"
    assert compare_main(out, "--methods", "promptfl,fedpurel", "--seeds", "0,1", "train.rounds=3") == 0
    assert calls(fake_log) == [
        ["train.rounds=3", f"method.name='{method}' seed={seed}"]
        for method in ("promptfl", "fedpurel")
        for seed in (0, 1)
    ]
    lines = job_lines(capsys.readouterr().out)
    assert len(lines) == 4 and all(" done " in line for line in lines)
    assert "fedpurel" in lines[2] and "seed 0" in lines[2] and "GM All  58.0" in lines[2] and "PM All  63.0" in lines[2]
    for method in ("promptfl", "fedpurel"):
        for seed in (0, 1):
            job_dir = out / "runs" / method / f"seed{seed}"
            (run_dir,) = [p for p in job_dir.iterdir() if p.is_dir()]
            assert json.loads((run_dir / "results.json").read_text())["config"]["seed"] == seed
            record = json.loads((job_dir / "job.json").read_text())
            assert (record["method"], record["seed"], record["overrides"]) == (method, seed, ["train.rounds=3"])
            assert record["returncode"] == 0 and record["wall_time"] >= 0
            assert "fake run of" in (job_dir / "run.log").read_text()
    for name in ("results.md", "results.csv", *PLOT_FILES):
        assert (out / name).is_file(), name


def test_the_run_command_comes_from_the_environment(tmp_path, fake_log, monkeypatch):
    monkeypatch.setenv("FEDPUREL_RUN_COMMAND", shlex.join(FAKE_RUN))
    assert compare.main(["--out", str(tmp_path / "cmp"), "--methods", "pft", "--seeds", "3"]) == 0
    assert calls(fake_log) == [["method.name='pft' seed=3"]]


def test_resume_skips_complete_jobs_and_reruns_an_unfinished_one(tmp_path, fake_log, capsys):
    out = tmp_path / "cmp"
    args = ("--methods", "promptfl,fedpurel", "--seeds", "0,1")
    assert compare_main(out, *args) == 0
    complete = {p: p.read_bytes() for p in (out / "runs").rglob("results.json")}
    unfinished = next((out / "runs" / "fedpurel" / "seed1").glob("*/results.json"))
    data = json.loads(unfinished.read_text())
    unfinished.write_text(json.dumps({**data, "final": {}}))
    fake_log.unlink()
    capsys.readouterr()

    assert compare_main(out, *args) == 0
    assert calls(fake_log) == [["method.name='fedpurel' seed=1"]]
    lines = job_lines(capsys.readouterr().out)
    assert [line.split()[4] for line in lines] == ["skipped", "skipped", "skipped", "done"]
    assert "GM All  58.0" in lines[0], "a skipped job still shows its accuracies"
    for path, content in complete.items():
        if path != unfinished:
            assert path.read_bytes() == content, f"{path} was touched"
    (stale,) = (out / "stale" / "fedpurel" / "seed1").glob("*/results.json")
    assert json.loads(stale.read_text())["final"] == {}, "the unfinished run is set aside, not kept in runs/"
    assert len(list((out / "runs" / "fedpurel" / "seed1").glob("*/results.json"))) == 1


def test_other_overrides_rerun_every_job_and_keep_the_old_results_aside(tmp_path, fake_log):
    out = tmp_path / "cmp"
    assert compare_main(out, "--methods", "lp-ft", "--seeds", "0,1", "train.rounds=3") == 0
    assert compare_main(out, "--methods", "lp-ft", "--seeds", "0,1", "train.rounds=4") == 0
    assert [c[0] for c in calls(fake_log)] == ["train.rounds=3"] * 2 + ["train.rounds=4"] * 2
    stale = [json.loads(p.read_text()) for p in (out / "stale").rglob("results.json")]
    assert sorted(r["config"]["seed"] for r in stale) == [0, 1] and all(r["final"] for r in stale)
    current = [json.loads(p.read_text()) for p in (out / "runs").rglob("results.json")]
    assert [r["config"]["args"][0] for r in current] == ["train.rounds=4"] * 2


def test_a_failing_job_is_reported_and_the_others_run(tmp_path, fake_log, monkeypatch, capsys):
    out = tmp_path / "cmp"
    monkeypatch.setenv("FAKE_RUN_FAIL", "promptfl:0")
    assert compare_main(out, "--methods", "promptfl,fedpurel", "--seeds", "0,1") == 1
    captured = capsys.readouterr()
    lines = job_lines(captured.out)
    assert len(calls(fake_log)) == 4
    assert " failed " in lines[0] and "exit status 1" in lines[0] and "run.log" in lines[0]
    assert all(" done " in line for line in lines[1:])
    assert "1 of 4 job(s) failed: promptfl seed 0" in captured.err
    report = (out / "results.md").read_text()
    promptfl = next(line for line in report.splitlines() if line.startswith("| promptfl |"))
    assert "| 1 | 1 |" in promptfl, "the report holds the complete seed only"

    monkeypatch.delenv("FAKE_RUN_FAIL")
    fake_log.unlink()
    assert compare_main(out, "--methods", "promptfl,fedpurel", "--seeds", "0,1") == 0
    assert calls(fake_log) == [["method.name='promptfl' seed=0"]]


def test_a_run_that_exits_zero_without_final_metrics_fails(tmp_path, fake_log, capsys):
    command = [sys.executable, "-c", "import sys; sys.exit(0)"]
    assert compare.main(["--out", str(tmp_path), "--methods", "fedpurel", "--seeds", "0"], run_command=command) == 1
    assert "no readable results.json" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "fedpurel,bogus"], "unknown method 'bogus'"),
        (["--methods", "fedpurel,fedpurel"], "listed twice"),
        (["--seeds", "0,x"], "bad seed 'x'"),
        (["--seeds", "-1"], "bad seed '-1'"),
        (["--seeds", ","], "--seeds is empty"),
        (["method.name='pft'"], "sets 'method.name': use --methods"),
        (["seed=1 peft.prompt.lr=0.1"], "sets 'seed': use --seeds"),
        (["peft.prompt.lr=="], "cannot parse override"),
        (["train.rounds=2 oops"], "cannot parse override"),
        ([""], "holds no key=value pair"),
        (["configs/no-such-preset.toml"], "preset configs/no-such-preset.toml not found"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(tmp_path, fake_log, capsys, args, message):
    assert compare_main(tmp_path / "cmp", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert calls(fake_log) == [] and not (tmp_path / "cmp").exists()


def test_the_command_line_rejects_an_unknown_method_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedpurel_cli.main", "compare", "--out", str(tmp_path), "--methods", "bogus"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown method 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


# --- the report -------------------------------------------------------------------------------


def write_run(folder, method, seed, gm_all, worst, pm_all, wall, reports=None, **extra):
    """A fabricated results.json: Many/Medium/Few fixed, zero-shot GM All 0.5 + seed / 10."""
    gm = {"all": gm_all, "many": 0.9, "medium": 0.6, "few": 0.3, "balancedness": worst, "per_class": [0.9, 0.6, 0.3]}
    pm = {"all": pm_all, "many": 0.95, "medium": 0.7, "few": 0.4, "balancedness": 0.2}
    data = {
        "config": {"method.name": method, "seed": seed},
        "zero_shot": {"gm": {**gm, "all": 0.5 + seed / 10, "per_class": [0.8, 0.7, 0.6]}, "pm": {"all": 0.55}},
        "rounds": [
            {"round": 1, "phase": "global", "gm": gm, "train": {"conflict-rate": 0.4}},
            {"round": 2, "phase": "personal", "pm": pm},
        ],
        "final": {"gm": gm, "pm": pm, "wall_time": wall},
        "class_counts": [50, 10, 2],
        **extra,
    }
    if reports is not None:
        data["method"] = {"name": method, "reports": reports}
    path = folder / f"{method}-{seed}"
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(data))


@pytest.fixture
def fabricated(tmp_path):
    """fedpurel over 3 seeds (both metrics), pft over 2 seeds (PM only), an unfinished run."""
    runs = tmp_path / "runs"
    for seed, (gm_all, worst, pm_all, wall) in enumerate(
        [(0.70, 0.1, 0.80, 10), (0.80, 0.2, 0.90, 20), (0.75, 0.3, 0.85, 30)]
    ):
        write_run(runs, "fedpurel", seed, gm_all, worst, pm_all, wall)
    write_run(runs, "pft", 0, 0.1, 0.0, 0.60, 5, reports=["pm"])
    write_run(runs, "pft", 1, 0.1, 0.0, 0.70, 7, reports=["pm"])
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "results.json").write_text(json.dumps({"config": {"method.name": "pft"}, "final": {}}))
    return runs


def cells(markdown: str, name: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_table_mean_and_std_over_seeds_by_hand(fabricated):
    text = table(load_runs(fabricated))
    rows = [line.split("|")[1].strip() for line in text.splitlines()[2:]]
    assert rows == ["zero-shot CLIP", "fedpurel", "pft"]
    # GM All 70, 80, 75: mean 75, population std sqrt(50/3) = 4.08; worst 10, 20, 30: 20 ± sqrt(200/3) = 8.16
    assert cells(text, "fedpurel") == [
        "fedpurel",
        "0,1,2",
        "3",
        "75.0 ± 4.1",
        "90.0 ± 0.0",
        "60.0 ± 0.0",
        "30.0 ± 0.0",
        "20.0 ± 8.2",
        "85.0 ± 4.1",
        "–",  # stability: these runs record no rounds
        "20.0 ± 8.2",
    ]
    # PM only: every GM column is "–"; PM 60, 70: 65 ± 5; wall 5, 7: 6 ± 1
    assert cells(text, "pft") == ["pft", "0,1", "2", "–", "–", "–", "–", "–", "65.0 ± 5.0", "–", "6.0 ± 1.0"]
    # zero-shot GM All per seed 50, 60, 70 (pft's runs of seeds 0 and 1 average in): 60 ± 8.2; no wall time
    assert cells(text, "zero-shot CLIP")[1:4] + cells(text, "zero-shot CLIP")[8:] == [
        "0,1,2",
        "3",
        "60.0 ± 8.2",
        "55.0 ± 0.0",
        "–",
        "–",
    ]


def test_csv_holds_the_same_numbers_and_one_row_per_run(fabricated, tmp_path):
    write_report(load_runs(fabricated), tmp_path / "report")
    with (tmp_path / "report" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    means = {row["method"]: row for row in rows if row["row"] == "mean"}
    assert list(means) == ["zero-shot CLIP", "fedpurel", "pft"]
    assert float(means["fedpurel"]["gm_all"]) == pytest.approx(75.0)
    assert float(means["fedpurel"]["gm_all_std"]) == pytest.approx((50 / 3) ** 0.5, abs=1e-4)
    assert float(means["fedpurel"]["pm_few"]) == pytest.approx(40.0)
    assert (means["fedpurel"]["seed"], means["fedpurel"]["n_seeds"]) == ("0 1 2", "3")
    assert means["pft"]["gm_all"] == "" and means["pft"]["gm_worst_class"] == ""
    assert float(means["pft"]["pm_all"]) == pytest.approx(65.0) and float(means["pft"]["wall_time_s"]) == 6.0
    zero_shot = means["zero-shot CLIP"]
    assert float(zero_shot["gm_all"]) == pytest.approx(60.0) and zero_shot["wall_time_s"] == ""
    runs = [row for row in rows if row["row"] == "run"]
    assert sorted((r["method"], r["seed"]) for r in runs) == [
        ("fedpurel", "0"),
        ("fedpurel", "1"),
        ("fedpurel", "2"),
        ("pft", "0"),
        ("pft", "1"),
    ]
    first = next(r for r in runs if (r["method"], r["seed"]) == ("fedpurel", "1"))
    assert float(first["gm_all"]) == pytest.approx(80.0) and first["gm_all_std"] == ""
    assert first["path"] == "../runs/fedpurel-1/results.json"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 5000, f"{path.name} is only {len(data)} bytes"


def test_every_plot_is_a_png(fabricated, tmp_path):
    paths = write_report(load_runs(fabricated), tmp_path / "report")
    assert [p.name for p in paths] == ["results.md", "results.csv", *PLOT_FILES]
    for name in PLOT_FILES:
        assert_png(tmp_path / "report" / name)
    assert "![per_class_vs_count](per_class_vs_count.png)" in (tmp_path / "report" / "results.md").read_text()


def test_plots_are_written_when_runs_lack_rounds_counts_and_conflict_rates(tmp_path):
    write_run(tmp_path / "runs", "zero-shot", 0, 0.5, 0.1, 0.55, 1.0, rounds=[], class_counts=None)
    paths = write_report(load_runs(tmp_path / "runs"), tmp_path / "report")
    for path in paths[2:]:
        assert_png(path)


def test_report_cli_prints_a_flat_folder_and_writes_on_request(fabricated, tmp_path, capsys):
    assert report_main([str(fabricated)]) == 0
    assert "| fedpurel | 0,1,2 | 3 | 75.0 ± 4.1 |" in capsys.readouterr().out
    assert not (fabricated / "results.md").exists()
    assert report_main([str(fabricated), "--write-to", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "results.csv").is_file()
    assert report_main([str(tmp_path / "missing")]) == 2


def test_a_zero_shot_method_run_replaces_the_zero_shot_row(fabricated):
    write_run(fabricated, "zero-shot", 0, 0.6, 0.1, 0.6, 2)
    rows = [line.split("|")[1].strip() for line in table(load_runs(fabricated)).splitlines()[2:]]
    assert rows == ["zero-shot", "fedpurel", "pft"]


def test_variants_give_a_job_each_and_a_report_per_variant(tmp_path, fake_log):
    out = tmp_path / "cmp"
    assert compare_main(out, "--methods", "promptfl,fedpurel", "--seeds", "0", "--variants", "prompt,lora") == 0
    assert sorted(args[-1] for args in calls(fake_log)) == sorted(
        f"method.name='{m}' seed=0 peft.name='{v}'" for v in ("prompt", "lora") for m in ("promptfl", "fedpurel")
    )
    for variant in ("prompt", "lora"):
        for method in ("promptfl", "fedpurel"):
            assert (out / "runs" / variant / method / "seed0" / "job.json").is_file()
        assert (out / variant / "results.md").is_file() and (out / variant / "results.csv").is_file()
    combined = (out / "results.md").read_text()
    assert "## prompt" in combined and "## lora" in combined
    # resumable per variant: nothing runs again
    before = len(calls(fake_log))
    assert compare_main(out, "--methods", "promptfl,fedpurel", "--seeds", "0", "--variants", "prompt,lora") == 0
    assert len(calls(fake_log)) == before


def test_jobs_run_side_by_side_with_one_line_each_in_job_order_of_completion(tmp_path, fake_log, monkeypatch, capsys):
    """With --jobs 4, 4 jobs run at the same time: each waits at a barrier until all 4 have arrived
    (a job that ran alone would give up and fail)."""
    (tmp_path / "barrier").mkdir()
    monkeypatch.setenv("FAKE_RUN_BARRIER", f"{tmp_path / 'barrier'}:4")
    assert (
        compare.main(
            [
                "--out",
                str(tmp_path / "cmp"),
                "--methods",
                "promptfl,fedpurel",
                "--seeds",
                "0,1",
                "--engine",
                "inprocess",
                "--jobs",
                "4",
            ],
            run_command=FAKE_RUN,
        )
        == 0
    )
    assert len(list((tmp_path / "barrier").iterdir())) == 4
    lines = job_lines(capsys.readouterr().out)
    assert [line.split("]")[0] for line in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]


def test_the_flower_engine_refuses_parallel_jobs(tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path), "--jobs", "2"]) == 2
    assert "one job at a time" in capsys.readouterr().err


def test_the_inprocess_engine_runs_scripts_run_inprocess(monkeypatch):
    monkeypatch.delenv("FEDPUREL_RUN_COMMAND", raising=False)
    command = compare.run_command_from_env("inprocess")
    assert command[-1].endswith("scripts/run-inprocess.sh") and Path(command[-1]).is_file()


def test_the_stability_column_is_the_std_of_gm_all_over_the_last_ten_global_rounds():
    from fedpurel_cli.report import METRIC, metric_value

    rounds = [{"round": r, "phase": "global", "gm": {"all": 0.5 + 0.01 * (r % 2)}} for r in range(1, 13)]
    rounds.append({"round": 13, "phase": "personal", "pm": {"all": 0.9}})
    run = {"config": {}, "rounds": rounds, "final": {"gm": {"all": 0.5}}}
    assert metric_value(run, METRIC["gm_stability"]) == pytest.approx(0.5)  # std of 0.50/0.51 alternating, in %
