"""Run methods x seeds on one config, one job after another, then write the comparison report.

    fedpurel compare                       # all methods, seeds 0,1,2 -> outputs/compare
    fedpurel compare --methods fedpurel,promptfl --seeds 0,1 configs/x.toml "train.rounds=10"

Each job runs ``bash scripts/run.sh <presets and overrides> "method='<m>' seed=<k>"``
with ``OUTPUT_DIR=<out>/runs/<m>/seed<k>``. Next to the run folder that
run.sh creates there, ``job.json`` records the job's overrides, the presets'
digests, the exit status and the wall time of the whole command, and
``run.log`` its output. A job whose folder holds one complete results.json of
the same method and seed, made with the same overrides and presets, is
skipped; otherwise any run folder in it is moved to ``<out>/stale/`` (never
deleted) and the job runs again. After the jobs, ``<out>/results.md``,
``results.csv`` and the plots are written from every complete run under
``<out>/runs/`` (see :mod:`fedpurel_cli.report`).

``FEDPUREL_RUN_COMMAND`` (or :func:`main`'s ``run_command``) replaces
``bash scripts/run.sh``. Exit status: 0 when every job is complete, 1 when a
job failed, 2 on bad arguments, 130 when interrupted (run again to resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .overrides import merge
from .plots import PlotsUnavailable
from .report import METHODS, METRIC, load_runs, metric_value, run_method
from .reporting import write_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SEEDS = "0,1,2"
DEFAULT_OUT = "outputs/compare"
RUN_COMMAND_ENV = "FEDPUREL_RUN_COMMAND"
JOB_FILE, LOG_FILE, RESULTS_FILE = "job.json", "run.log", "results.json"
RESERVED_KEYS = ("method.name", "seed", "peft.name")  # set by the runner for each job
ENGINES = {
    # Flower simulation, as `bash scripts/run.sh` runs it: one job at a time (one local SuperLink port)
    "flower": ["bash", "scripts/run.sh"],
    # the same computations in one process (bench/inprocess.py: phi_g and GM bitwise equal to Flower's)
    "inprocess": ["bash", "scripts/run-inprocess.sh"],
}
STOP_GRACE_S = 60.0  # how long an interrupted job may take to stop (run.sh stops its SuperLink)


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit status 2."""


@dataclass(frozen=True)
class Job:
    """One run of the comparison: a method, a seed and (with --variants) a PEFT variant."""

    method: str
    seed: int
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}/{self.variant}" if self.variant else self.method

    def folder(self, out: Path) -> Path:
        """Where the job's run folder, job.json and run.log live."""
        if self.variant:
            return out / "runs" / self.variant / self.method / f"seed{self.seed}"
        return out / "runs" / self.method / f"seed{self.seed}"

    def run_args(self, overrides: Sequence[str]) -> list[str]:
        """Arguments for run.sh: the shared presets and overrides, then this job's method, seed (and variant)."""
        variant = f" peft.name='{self.variant}'" if self.variant else ""
        return [*overrides, f"method.name='{self.method}' seed={self.seed}{variant}"]


@dataclass(frozen=True)
class Outcome:
    """What happened to a job: status "done", "skipped" or "failed"."""

    job: Job
    status: str
    wall_time: float | None = None
    results: dict | None = None
    reason: str = ""


def parse_methods(text: str) -> tuple[str, ...]:
    """A comma-separated list of known, distinct method names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise UsageError(f"--methods is empty; choose from {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            raise UsageError(f"unknown method {name!r} in --methods; choose from {', '.join(METHODS)}")
        if names.count(name) > 1:
            raise UsageError(f"method {name!r} is listed twice in --methods")
    return names


def parse_variants(text: str) -> tuple[str, ...]:
    """A comma-separated list of known, distinct PEFT variants; ("",) when empty (the config's own)."""
    from fedpurel_app.registry import PEFT_VARIANTS

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if name not in PEFT_VARIANTS:
            raise UsageError(f"unknown PEFT variant {name!r} in --variants; choose from {', '.join(PEFT_VARIANTS)}")
        if names.count(name) > 1:
            raise UsageError(f"variant {name!r} is listed twice in --variants")
    return names or ("",)


def parse_seeds(text: str) -> tuple[int, ...]:
    """A comma-separated list of distinct non-negative integers."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError("--seeds is empty; give e.g. --seeds 0,1,2")
    seeds = []
    for item in items:
        if not item.isdigit():
            raise UsageError(f"bad seed {item!r} in --seeds: seeds are non-negative integers, e.g. --seeds 0,1,2")
        if int(item) in seeds:
            raise UsageError(f"seed {int(item)} is listed twice in --seeds")
        seeds.append(int(item))
    return tuple(seeds)


def preset_digests(overrides: Sequence[str]) -> dict[str, str]:
    """SHA-256 of each preset (.toml argument), resolved against the repository as run.sh does."""
    digests = {}
    for arg in overrides:
        if arg.endswith(".toml"):
            path = REPO / arg
            if not path.is_file():
                raise UsageError(f"preset {arg} not found (paths are relative to {REPO}, as for scripts/run.sh)")
            digests[arg] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def check_overrides(overrides: Sequence[str]) -> None:
    """Key=value strings must parse as run.sh parses them and must not set the runner's own keys."""
    for arg in overrides:
        if arg.endswith(".toml"):
            continue
        try:
            keys = merge([arg])
        except Exception as error:  # tomllib's message names the bad value
            raise UsageError(f"cannot parse override {arg!r}: {error}") from None
        if not keys:
            raise UsageError(f"override {arg!r} holds no key=value pair")
        for key in RESERVED_KEYS:
            if key in keys:
                raise UsageError(f"override {arg!r} sets {key!r}: use --{key.split('.')[0]}s instead")


def run_command_from_env(engine: str = "flower") -> list[str]:
    """``FEDPUREL_RUN_COMMAND`` split like a shell would, else the ``engine``'s script."""
    text = os.environ.get(RUN_COMMAND_ENV)
    if text is None:
        program, script = ENGINES[engine]
        return [program, str(REPO / script)]
    command = shlex.split(text)
    if not command:
        raise UsageError(f"{RUN_COMMAND_ENV} is set but empty")
    return command


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_folders(job_dir: Path) -> list[Path]:
    """The run folders run.sh created in a job folder (sorted: their names start with the time)."""
    return sorted(p for p in job_dir.iterdir() if p.is_dir()) if job_dir.is_dir() else []


def result_problem(results: dict | None, job: Job) -> str | None:
    """Why ``results`` is not a complete run of ``job``; None when it is."""
    if results is None:
        return "no readable results.json"
    if not results.get("final"):
        return "results.json has no final metrics (the run did not finish)"
    named = (results.get("method") or {}).get("name") or results.get("config", {}).get("method.name")
    if not named:
        return "results.json names no method (does the run config know the key 'method.name'?)"
    if run_method(results) != job.method:
        return f"results.json is a run of {run_method(results)!r}"
    if results.get("config", {}).get("seed") != job.seed:
        return f"results.json is a run of seed {results.get('config', {}).get('seed')!r}"
    if job.variant and results.get("config", {}).get("peft.name") != job.variant:
        return f"results.json is a run of PEFT variant {results.get('config', {}).get('peft.name')!r}"
    return None


def job_signature(job: Job, overrides: Sequence[str], presets: dict[str, str]) -> dict:
    """What must match for a finished job to be reused."""
    signature = {"method": job.method, "seed": job.seed, "overrides": list(overrides), "presets": presets}
    return {**signature, "variant": job.variant} if job.variant else signature


def completed(job_dir: Path, job: Job, signature: dict) -> dict | None:
    """The job's results when its folder holds exactly one run, complete, with this signature and exit 0."""
    record = read_json(job_dir / JOB_FILE)
    if record is None or record.get("returncode") != 0 or any(record.get(k) != v for k, v in signature.items()):
        return None
    folders = run_folders(job_dir)
    if len(folders) != 1:
        return None
    results = read_json(folders[0] / RESULTS_FILE)
    return results if result_problem(results, job) is None else None


def unique_path(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... whichever does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def set_aside(job_dir: Path, stale_dir: Path) -> list[Path]:
    """Move every run folder of ``job_dir`` into ``stale_dir``; return where they went."""
    moved = []
    for folder in run_folders(job_dir):
        stale_dir.mkdir(parents=True, exist_ok=True)
        target = unique_path(stale_dir / folder.name)
        shutil.move(str(folder), str(target))
        moved.append(target)
    return moved


def execute(command: Sequence[str], env: dict[str, str], log_path: Path) -> int:
    """Run ``command`` with its output in ``log_path``; on Ctrl-C let it stop cleanly, then re-raise."""
    with log_path.open("w") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise


def last_line(path: Path, width: int = 120) -> str:
    """The last non-empty line of a text file, shortened to ``width`` characters."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:width] if lines else ""


def run_job(job: Job, out: Path, command: Sequence[str], overrides: Sequence[str], signature: dict) -> Outcome:
    """Run one job in a clean job folder and check its results.json; write job.json."""
    job_dir = job.folder(out)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / JOB_FILE).unlink(missing_ok=True)
    set_aside(job_dir, out / "stale" / job.method / f"seed{job.seed}")
    env = {**os.environ, "OUTPUT_DIR": str(job_dir)}
    started = time.perf_counter()
    returncode = execute([*command, *job.run_args(overrides)], env, job_dir / LOG_FILE)
    wall_time = round(time.perf_counter() - started, 3)
    folders = run_folders(job_dir)
    results = read_json(folders[-1] / RESULTS_FILE) if folders else None
    if returncode != 0:
        tail = last_line(job_dir / LOG_FILE)
        problem = f"exit status {returncode}" + (f": {tail}" if tail else "")
    elif len(folders) > 1:
        problem = f"the command made {len(folders)} run folders, expected one"
    else:
        problem = result_problem(results, job)
    record = {**signature, "command": [*command, *job.run_args(overrides)], "returncode": returncode}
    record.update(wall_time=wall_time, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (job_dir / JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if problem:
        return Outcome(job, "failed", wall_time, None, f"{problem} (log: {job_dir / LOG_FILE})")
    return Outcome(job, "done", wall_time, results)


def format_outcome(outcome: Outcome) -> str:
    """The status part of a job's line: status, GM All, PM All, wall time, and why it failed."""

    def accuracy(key: str) -> str:
        value = metric_value(outcome.results, METRIC[key]) if outcome.results else math.nan
        return "    –" if math.isnan(value) else f"{value:5.1f}"

    seconds = "–" if outcome.wall_time is None else f"{outcome.wall_time:.0f} s"
    line = f"{outcome.status:<7}  GM All {accuracy('gm_all')}  PM All {accuracy('pm_all')}  {seconds:>7}"
    return f"{line}  {outcome.reason}" if outcome.reason else line


def run_all(
    jobs: Sequence[Job],
    out: Path,
    command: Sequence[str],
    overrides: Sequence[str],
    presets: dict[str, str],
    parallel: int = 1,
) -> list[Outcome]:
    """Run or skip every job, ``parallel`` at a time, one line each as it ends and a progress bar
    (jobs done, time left; on a terminal only); a failed job does not stop the rest."""
    from tqdm import tqdm

    outcomes: dict[Job, Outcome] = {}
    pending = []
    for job in jobs:
        signature = job_signature(job, overrides, presets)
        results = completed(job.folder(out), job, signature)
        if results is not None:
            record = read_json(job.folder(out) / JOB_FILE) or {}
            outcomes[job] = Outcome(job, "skipped", record.get("wall_time"), results)
        else:
            pending.append((job, signature))
    width = len(str(len(jobs)))
    done = 0

    def line(outcome: Outcome) -> str:
        nonlocal done
        done += 1
        job = outcome.job
        return f"[{done:>{width}}/{len(jobs)}] {job.name:<20} seed {job.seed:<3} {format_outcome(outcome)}"

    for outcome in outcomes.values():
        print(line(outcome), flush=True)
    bar = tqdm(total=len(pending), desc="jobs", unit="job", disable=None, leave=False)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:  # the jobs are processes: threads wait
        futures = {pool.submit(run_job, job, out, command, overrides, sig): job for job, sig in pending}
        try:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome.job] = outcome
                bar.update()
                tqdm.write(line(outcome))
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            raise
        finally:
            bar.close()
    return [outcomes[job] for job in jobs]


def other_overrides(out: Path, overrides: Sequence[str], presets: dict[str, str]) -> list[Path]:
    """Job folders under ``<out>/runs`` whose job.json records other overrides or presets than these."""
    return [
        path.parent
        for path in sorted((out / "runs").glob(f"*/*/{JOB_FILE}"))
        if (record := read_json(path)) is not None
        and (record.get("overrides"), record.get("presets")) != (list(overrides), presets)
    ]


def write_comparison_report(out: Path, overrides: Sequence[str], presets: dict[str, str]) -> None:
    """Write the report of every complete run under ``<out>/runs`` into ``out`` and say where it is."""
    runs = load_runs(out / "runs")
    if not runs:
        print(f"no complete run under {out / 'runs'}: no report written", file=sys.stderr)
        return
    mixed = other_overrides(out, overrides, presets)
    if mixed:
        print(
            f"note: {len(mixed)} job(s) in the report ran with other overrides or presets, "
            f"e.g. {mixed[0].relative_to(out)} (see its {JOB_FILE})",
            file=sys.stderr,
        )
    try:
        write_report(runs, out)
    except PlotsUnavailable as error:
        print(f"{error}; results.md and results.csv are written", file=sys.stderr)
    print(f"report of {len(runs)} run(s): {out / 'results.md'}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line: --methods, --seeds, --out and run.sh's presets and overrides."""
    parser = argparse.ArgumentParser(
        prog="fedpurel compare",
        description="Run methods x seeds with scripts/run.sh (resumable), then write results.md, "
        "results.csv and plots into --out.",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list (default: {','.join(METHODS)})")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma list of integers (default: {DEFAULT_SEEDS})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--variants", default="", help="comma list of PEFT variants (default: the config's)")
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default="flower",
        help="flower: scripts/run.sh, one job at a time; inprocess: the same computations "
        "without Flower (bench/inprocess.py), several jobs at a time",
    )
    parser.add_argument("--jobs", type=int, default=1, help="jobs at a time (inprocess engine; default 1)")
    parser.add_argument("overrides", nargs="*", help="presets (.toml) and key=value strings, as scripts/run.sh takes")
    return parser.parse_intermixed_args(list(argv))


def main(argv: Sequence[str] | None = None, run_command: Sequence[str] | None = None) -> int:
    """Validate the input, run the jobs, write the report; the exit status (see the module doc)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
        variants = parse_variants(args.variants)
        check_overrides(args.overrides)
        presets = preset_digests(args.overrides)
        command = list(run_command) if run_command is not None else run_command_from_env(args.engine)
        if args.jobs < 1:
            raise UsageError(f"--jobs {args.jobs}: give 1 or more")
        if args.jobs > 1 and args.engine == "flower" and run_command is None and RUN_COMMAND_ENV not in os.environ:
            raise UsageError(
                "the flower engine runs one job at a time (every job starts the local SuperLink on "
                "its one port): use --engine inprocess for --jobs > 1"
            )
    except UsageError as error:
        print(f"compare: {error}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    jobs = [Job(method, seed, variant) for variant in variants for method in methods for seed in seeds]
    try:
        outcomes = run_all(jobs, out, command, args.overrides, presets, args.jobs)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: run the same command again to resume (complete jobs are kept in {out / 'runs'})",
            file=sys.stderr,
        )
        return 130
    write_comparison_report(out, args.overrides, presets)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        names = ", ".join(f"{o.job.method} seed {o.job.seed}" for o in failed)
        print(f"{len(failed)} of {len(jobs)} job(s) failed: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
