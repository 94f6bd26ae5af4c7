"""Summarise finished runs: one row per method, mean ± std over seeds; CSV and plots.

    fedpurel report outputs/                  # print the table of every results.json below the folder
    fedpurel report outputs/compare/runs --write-to outputs/compare
                                              # also write results.md, results.csv and the PNG plots

A method is the run config's ``method.name``. The first row is
the frozen zero-shot CLIP that every run measures. A method shows only the
metrics it reports (``method.reports`` in results.json: ``gm`` and/or ``pm``;
both when absent), the others are "–". Accuracies are in percent. Runs of a
method with the same seed are averaged first; mean and standard deviation
(population, ddof = 0) are then over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpurel_app.registry import METHODS as _REGISTRY

# Every method of the comparison, in the order of table rows and plot legends: the registry's.
METHODS = _REGISTRY.names()
ZERO_SHOT_ROW = "zero-shot CLIP"
MISSING = "–"
MARKDOWN_FILE, CSV_FILE = "results.md", "results.csv"


@dataclass(frozen=True)
class Metric:
    """One number of a run: ``model`` is "gm", "pm" or "time"; ``field`` its key there."""

    key: str
    label: str
    model: str
    field: str

    @property
    def scale(self) -> float:
        """Accuracies are shown in percent, times in seconds."""
        return 1.0 if self.model == "time" else 100.0


STABILITY_ROUNDS = 10


METRICS = (
    Metric("gm_all", "GM All", "gm", "all"),
    Metric("gm_many", "Many", "gm", "many"),
    Metric("gm_medium", "Medium", "gm", "medium"),
    Metric("gm_few", "Few", "gm", "few"),
    Metric("gm_worst_class", "worst class", "gm", "balancedness"),
    Metric("pm_all", "PM All", "pm", "all"),
    Metric("pm_many", "PM Many", "pm", "many"),
    Metric("pm_medium", "PM Medium", "pm", "medium"),
    Metric("pm_few", "PM Few", "pm", "few"),
    Metric("pm_worst_class", "PM worst class", "pm", "balancedness"),
    Metric("gm_stability", "GM All std, last 10 rounds", "stability", "all"),
    Metric("wall_time_s", "rounds wall time (s)", "time", "wall_time"),
)
METRIC = {metric.key: metric for metric in METRICS}
TABLE_METRICS = (
    "gm_all",
    "gm_many",
    "gm_medium",
    "gm_few",
    "gm_worst_class",
    "pm_all",
    "gm_stability",
    "wall_time_s",
)


@dataclass(frozen=True)
class Group:
    """The runs of one table row; ``zero_shot`` rows read the frozen CLIP's metrics."""

    name: str
    runs: list[dict]
    zero_shot: bool = False


@dataclass(frozen=True)
class Summary:
    """One table row: its seeds and, per metric key, (mean, std, number of seeds with a value)."""

    name: str
    seeds: tuple
    values: dict[str, tuple[float, float, int]]


def load_runs(folder: Path) -> list[dict]:
    """Every complete results.json below ``folder`` (non-empty ``final``), with its path under ``_path``."""
    runs = []
    for path in sorted(Path(folder).rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("final"):
            data["_path"] = str(path)
            runs.append(data)
    return runs


def method_name(config: dict) -> str:
    """The method a run config (flat, as in results.json) names."""
    return str(config.get("method.name") or "unknown method")


def run_variant(run: dict) -> str:
    """The PEFT variant of one run (``peft.name`` of its config)."""
    return str(run["config"].get("peft.name") or "unknown variant")


def by_variant(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs of each PEFT variant, in the registry's order of variants."""
    from fedpurel_app.registry import PEFT_VARIANTS

    out: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        out[run_variant(run)].append(run)
    order = PEFT_VARIANTS.names()
    return {k: out[k] for k in sorted(out, key=lambda v: (order.index(v) if v in order else len(order), v))}


def run_method(run: dict) -> str:
    """The method of one run: ``method.name`` in results.json, else from its config."""
    return (run.get("method") or {}).get("name") or method_name(run["config"])


def reported(run: dict) -> tuple[str, ...]:
    """Which of "gm" and "pm" the run's method reports (both when results.json does not say)."""
    return tuple((run.get("method") or {}).get("reports") or ("gm", "pm"))


def metric_value(run: dict, metric: Metric, zero_shot: bool = False) -> float:
    """One run's value of ``metric`` in display units; NaN when not reported or missing."""
    if metric.model == "time":
        value = None if zero_shot else run["final"].get("wall_time")
    elif metric.model == "stability":  # the std over the last GM evaluations of Stage 1
        values = [r["gm"][metric.field] for r in run.get("rounds", []) if r.get("phase") == "global" and "gm" in r]
        last = values[-STABILITY_ROUNDS:]
        value = None if zero_shot or "gm" not in reported(run) or len(last) < 2 else float(np.std(last))
    elif not zero_shot and metric.model not in reported(run):
        value = None
    else:
        source = run.get("zero_shot", {}) if zero_shot else run["final"]
        value = (source.get(metric.model) or {}).get(metric.field)
    return math.nan if value is None else metric.scale * float(value)


def _order(name: str) -> tuple[int, str]:
    return (METHODS.index(name), "") if name in METHODS else (len(METHODS), name)


def groups(runs: list[dict]) -> list[Group]:
    """The zero-shot row (from every run, unless the ``zero-shot`` method ran: then its own
    row), then one group per method in ``METHODS`` order, others by name."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[run_method(run)].append(run)
    first = [] if "zero-shot" in by_method else [Group(ZERO_SHOT_ROW, runs, zero_shot=True)]
    return first + [Group(name, by_method[name]) for name in sorted(by_method, key=_order)]


def nan_mean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def per_seed(runs: list[dict], value: Callable[[dict], float]) -> list[float]:
    """``value(run)`` averaged over the runs of each seed: one number per seed."""
    by_seed: dict = defaultdict(list)
    for run in runs:
        by_seed[run["config"].get("seed")].append(value(run))
    return [nan_mean(values) for values in by_seed.values()]


def stats(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, population standard deviation and count of the non-NaN values (NaN, NaN, 0 if none)."""
    kept = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if kept.size == 0:
        return math.nan, math.nan, 0
    return float(kept.mean()), float(kept.std()), int(kept.size)


def seeds_of(runs: list[dict]) -> tuple:
    """The distinct seeds of ``runs``, sorted."""
    return tuple(sorted({run["config"].get("seed") for run in runs}, key=str))


def summarize(runs: list[dict]) -> list[Summary]:
    """One summary per table row: every metric's mean ± std over seeds."""
    summaries = []
    for group in groups(runs):
        values = {
            metric.key: stats(per_seed(group.runs, lambda run, m=metric, zs=group.zero_shot: metric_value(run, m, zs)))
            for metric in METRICS
        }
        summaries.append(Summary(group.name, seeds_of(group.runs), values))
    return summaries


def cell(mean: float, std: float, count: int) -> str:
    """ "mean ± std" with one decimal, the mean alone for one seed, "–" for none."""
    if count == 0:
        return MISSING
    return f"{mean:.1f} ± {std:.1f}" if count > 1 else f"{mean:.1f}"


def table(runs: list[dict]) -> str:
    """A markdown table: zero-shot, then one row per method (mean ± std over its seeds)."""
    labels = [METRIC[key].label for key in TABLE_METRICS]
    lines = [
        "| method | seeds | n | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for summary in summarize(runs):
        cells = [cell(*summary.values[key]) for key in TABLE_METRICS]
        seeds = ",".join(map(str, summary.seeds))
        lines.append(f"| {summary.name} | {seeds} | {len(summary.seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_columns() -> list[str]:
    """Header of results.csv: row kind, method, seeds, then each metric's value and std, then the run's file."""
    metric_columns = [column for metric in METRICS for column in (metric.key, f"{metric.key}_std")]
    return ["row", "method", "seed", "n_seeds", *metric_columns, "path"]


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def csv_rows(runs: list[dict], relative_to: Path | None = None) -> list[dict[str, str]]:
    """Rows of results.csv: one "mean" row per table row, then one "run" row per run (std empty)."""
    rows = []
    for summary in summarize(runs):
        row = {"row": "mean", "method": summary.name, "seed": " ".join(map(str, summary.seeds))}
        row["n_seeds"] = str(len(summary.seeds))
        for key, (mean, std, _) in summary.values.items():
            row[key], row[f"{key}_std"] = _number(mean), _number(std)
        rows.append(row)
    for group in groups(runs)[1:]:
        for run in group.runs:
            row = {"row": "run", "method": group.name, "seed": str(run["config"].get("seed")), "n_seeds": "1"}
            row.update({metric.key: _number(metric_value(run, metric)) for metric in METRICS})
            path = run.get("_path", "")
            row["path"] = os.path.relpath(path, relative_to) if path and relative_to else path
            rows.append(row)
    return rows


def csv_text(runs: list[dict], relative_to: Path | None = None) -> str:
    """results.csv as text (accuracies in percent, wall time in seconds, empty = not reported)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(runs, relative_to))
    return buffer.getvalue()


def markdown(runs: list[dict], plots: Iterable[str] = ()) -> str:
    """results.md: what the numbers are, the table, and the plots."""
    parts = [
        "# Comparison",
        "",
        "GM: the global model on the balanced test set; PM: personalized accuracy on each client's own "
        "test set, mean over clients. Accuracies in %, mean ± std (population) over seeds; "
        f"worst class = balancedness; wall time of the run in seconds; {MISSING} = not reported by the method.",
        "",
        table(runs),
    ]
    parts += [line for name in plots for line in ("", f"![{Path(name).stem}]({name})")]
    return "\n".join(parts) + "\n"
