"""Every claim of the paper, checked on a finished comparison: a verdict per PEFT variant with the seeds' spread.

Reads the runs of ``fedpurel compare`` (every method, for each variant, the same seeds) and,
optionally, a lambda sweep of FedPuReL (runs that differ only in ``method.fedpurel.lam``), and
prints one Markdown table per claim. A difference is the mean over seeds of the per-seed
(paired) difference, ± its standard deviation over the seeds; a claim "holds" when the mean
difference has the claimed sign, and "within spread" when it does but by less than one std.

    python bench/claims.py outputs/compare                       # the claims on the comparison
    python bench/claims.py outputs/compare --lam outputs/compare outputs/lam   # and the lambda trade-off

Accuracies in percentage points. GM: the global model on the balanced test set (the last
round's); PM: the personalized models on the clients' own test sets (mean over clients; Many
and Few pooled over the clients' per-class counts).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedpurel_cli.report import by_variant, load_runs, run_method  # noqa: E402

STABILITY_ROUNDS = 10  # the last Stage-1 GM evaluations the stability figure is the std of
NEAR = 2.0  # "near zero-shot": Few at most this many points below zero-shot's
GM_BASELINES = ("promptfl", "promptfl-la", "fed-grab", "promptfolio")
PM_BASELINES = ("pft", "lp-ft", "promptfolio")

Value = Callable[[dict], float]


def gm(field: str) -> Value:
    return lambda run: 100 * run["final"]["gm"][field]


def zero_shot_gm(field: str) -> Value:
    return lambda run: 100 * run["zero_shot"]["gm"][field]


def pm(field: str) -> Value:
    return lambda run: 100 * run["final"]["pm"][field]


def stability(run: dict) -> float:
    """Std of GM All over the last STABILITY_ROUNDS Stage-1 evaluations, in points."""
    values = [r["gm"]["all"] for r in run.get("rounds", []) if r.get("phase") == "global" and "gm" in r]
    return 100 * float(np.std(values[-STABILITY_ROUNDS:]))


def decay(run: dict) -> float:
    """GM All of the best Stage-1 round minus that of the last, in points (0: it ends at its best):
    a model that peaks early and declines scores high even with a small std."""
    values = [r["gm"]["all"] for r in run.get("rounds", []) if r.get("phase") == "global" and "gm" in r]
    return 100 * (max(values) - values[-1]) if values else math.nan


def gap(field: str) -> Value:
    """A confidence-gap figure of the final GM evaluation (fedpurel_app.tkl.confidence_gap)."""
    return lambda run: float(run["final"]["gm"].get(field, math.nan))


def by_seed(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """method -> seed -> run."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for run in runs:
        out[run_method(run)][int(run["config"]["seed"])] = run
    return out


def paired(runs: dict[str, dict[int, dict]], a: tuple[str, Value], b: tuple[str, Value]) -> list[float]:
    """Per-seed a - b over the seeds both have."""
    (ma, va), (mb, vb) = a, b
    seeds = sorted(set(runs.get(ma, {})) & set(runs.get(mb, {})))
    return [va(runs[ma][s]) - vb(runs[mb][s]) for s in seeds]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else 0.0


def cell(values: list[float], digits: int = 1) -> str:
    mean, std = mean_std(values)
    return "n/a" if math.isnan(mean) else f"{mean:+.{digits}f} ± {std:.{digits}f}"


def verdict(values: list[float], sign: int = 1) -> str:
    """'holds' / 'within spread' / 'fails' for a claimed difference of sign ``sign``."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "not measured"
    if sign * mean <= 0:
        return "fails"
    return "holds" if sign * mean > std else "within spread"


def near_verdict(values: list[float]) -> str:
    """'holds' when the mean is no more than NEAR points below 0."""
    mean = mean_std(values)[0]
    return "not measured" if math.isnan(mean) else ("holds" if mean >= -NEAR else "fails")


def level(runs: dict[str, dict[int, dict]], method: str, value: Value, digits: int = 1) -> str:
    values = [value(r) for r in runs.get(method, {}).values()]
    mean, std = mean_std(values)
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def claims(runs: dict[str, dict[int, dict]]) -> list[tuple[str, str, str]]:
    """(claim, measured, verdict) rows for one variant."""
    rows = []
    few_drop = paired(runs, ("promptfl", gm("few")), ("promptfl", zero_shot_gm("few")))
    worst_drop = paired(runs, ("promptfl", gm("balancedness")), ("promptfl", zero_shot_gm("balancedness")))
    many_gain = paired(runs, ("promptfl", gm("many")), ("promptfl", zero_shot_gm("many")))
    rows.append(
        (
            "fine-tuning impairs balancedness (PromptFL: Few and worst class below zero-shot)",
            f"Few {cell(few_drop)}, worst class {cell(worst_drop)}, Many {cell(many_gain)}",
            verdict(few_drop, -1)
            if verdict(few_drop, -1) == verdict(worst_drop, -1)
            else f"Few {verdict(few_drop, -1)}, worst class {verdict(worst_drop, -1)}",
        )
    )
    near = paired(runs, ("fedpurel", gm("few")), ("fedpurel", zero_shot_gm("few")))
    above_fl = paired(runs, ("fedpurel", gm("few")), ("promptfl", gm("few")))
    rows.append(
        (
            "purification keeps Few near zero-shot (FedPuReL GM Few - zero-shot; - PromptFL)",
            f"{cell(near)}; {cell(above_fl)} over PromptFL",
            f"{near_verdict(near)} (no more than {NEAR:g} points below); above PromptFL: {verdict(above_fl)}",
        )
    )
    zs = paired(runs, ("fedpurel", gm("all")), ("fedpurel", zero_shot_gm("all")))
    rows.append(("GM All above zero-shot (FedPuReL - zero-shot)", cell(zs), verdict(zs)))
    for base in GM_BASELINES:
        d = paired(runs, ("fedpurel", gm("all")), (base, gm("all")))
        rows.append((f"GM All above {base}", cell(d), verdict(d)))
    d = paired(runs, ("fedpurel", pm("all")), ("fedpurel", gm("all")))
    rows.append(("PM above GM (FedPuReL PM All - GM All)", cell(d), verdict(d)))
    for base in PM_BASELINES:
        d = paired(runs, ("fedpurel", pm("all")), (base, pm("all")))
        rows.append((f"PM All above {base}", cell(d), verdict(d)))
    d = paired(runs, ("fedpurel", gm("all")), ("fedpurel-kl", gm("all")))
    rows.append(("TKL at least as good as KL (GM All, fedpurel - fedpurel-kl)", cell(d), verdict(d)))
    d = paired(runs, ("fedpurel", gm("few")), ("fedpurel-kl", gm("few")))
    rows.append(("TKL at least as good as KL (GM Few)", cell(d), verdict(d)))
    for base in ("promptfl", "promptfl-la", "fed-grab", "promptfolio"):
        d = paired(runs, ("fedpurel", stability), (base, stability))
        rows.append((f"stability: std of GM All, last 10 rounds, below {base}'s", cell(d, 2), verdict(d, -1)))
        d = paired(runs, ("fedpurel", decay), (base, decay))
        rows.append((f"stability: decay (best round - last, GM All) below {base}'s", cell(d), verdict(d, -1)))
    return rows


def confidence_rows(runs: dict[str, dict[int, dict]]) -> list[tuple[str, ...]]:
    """The confidence gap that TKL's alignment removes, on the final global models."""
    rows = []
    for method in ("promptfl", "fedpurel-kl", "fedpurel"):
        if method not in runs:
            continue
        rows.append(
            (
                method,
                level(runs, method, gap("entropy"), 3),
                level(runs, method, gap("zero_shot_entropy"), 3),
                level(runs, method, gap("tau_ratio"), 3),
                level(runs, method, gap("kl_to_zero_shot"), 4),
                level(runs, method, gap("tkl_to_zero_shot"), 4),
            )
        )
    return rows


def lam_rows(folders: list[Path]) -> list[tuple[str, ...]]:
    """FedPuReL runs grouped by method.fedpurel.lam: PM All / Many / Few and GM All."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for run in (run for folder in folders for run in load_runs(folder)):
        if run_method(run) == "fedpurel":
            groups[(run["config"]["peft.name"], float(run["config"]["method.fedpurel.lam"]))].append(run)
    rows = []
    for (variant, lam), rs in sorted(groups.items()):
        one = {"fedpurel": {int(r["config"]["seed"]): r for r in rs}}
        rows.append(
            (
                variant,
                f"{lam:g}",
                str(len(rs)),
                level(one, "fedpurel", pm("all")),
                level(one, "fedpurel", pm("many")),
                level(one, "fedpurel", pm("medium")),
                level(one, "fedpurel", pm("few")),
                level(one, "fedpurel", gm("all")),
            )
        )
    return rows


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", type=Path, help="the --out folder of fedpurel compare")
    parser.add_argument(
        "--lam", type=Path, nargs="+", help="folders of FedPuReL runs that differ in method.fedpurel.lam"
    )
    args = parser.parse_args()
    for variant, runs in by_variant(load_runs(args.comparison)).items():
        grouped = by_seed(runs)
        seeds = sorted(grouped.get("fedpurel") or {s for m in grouped.values() for s in m})
        print(f"\n#### {variant} (seeds {', '.join(map(str, seeds))})\n")
        print(markdown_table(("claim", "measured (points, mean ± std over seeds)", "verdict"), claims(grouped)))
        print(f"\nConfidence of the final global model against zero-shot ({variant}, test set):\n")
        print(
            markdown_table(
                ("method", "entropy", "zero-shot entropy", "tau_f / tau_z", "KL to zero-shot", "TKL to zero-shot"),
                confidence_rows(grouped),
            )
        )
    if args.lam:
        print("\n#### lambda (FedPuReL's Stage 2: (1 - lam) CE(l_G + l_P) + lam CE(l_P))\n")
        print(
            markdown_table(
                ("variant", "lam", "runs", "PM All", "PM Many", "PM Medium", "PM Few", "GM All"), lam_rows(args.lam)
            )
        )


if __name__ == "__main__":
    main()
