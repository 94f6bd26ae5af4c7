"""Summarise finished runs: one markdown row per method, mean +- std over seeds.

    python -m fedpurel_app.report outputs/            # every results.json below the folder

A method is identified by its PEFT variant, ``align`` and Stage-2 schedule;
rows also show the frozen zero-shot CLIP (identical across methods for one
dataset and split).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = ("gm all", "many", "medium", "few", "balancedness", "pm all", "wall time (s)")


def load_runs(folder: Path) -> list[dict]:
    """Every complete results.json below ``folder`` (runs without final metrics are skipped)."""
    runs = []
    for path in sorted(Path(folder).rglob("results.json")):
        data = json.loads(path.read_text())
        if data.get("final", {}).get("gm"):
            runs.append(data)
    return runs


def method_name(config: dict) -> str:
    align = {"tkl": "fedpurel (tkl)", "kl": "fedpurel-kl", "none": "promptfl (no align)"}[config["align"]]
    return f"{align}, {config['peft']}, {config['personalization']}"


def _row(runs: list[dict], zero_shot: bool) -> list[list[float]]:
    values = []
    for run in runs:
        gm = run["zero_shot"]["gm"] if zero_shot else run["final"]["gm"]
        pm = run["zero_shot"].get("pm", {}) if zero_shot else run["final"].get("pm", {})
        wall = float("nan") if zero_shot else run["final"]["wall_time"]
        values.append([gm["all"], gm["many"], gm["medium"], gm["few"], gm["balancedness"], pm.get("all"), wall])
    return [[np.nan if v is None else v for v in row] for row in values]


def _cell(column: np.ndarray, percent: bool) -> str:
    column = column[~np.isnan(column)]
    if column.size == 0:
        return "-"
    factor = 100.0 if percent else 1.0
    mean, std = factor * column.mean(), factor * column.std()
    return f"{mean:.1f} ± {std:.1f}" if column.size > 1 else f"{mean:.1f}"


def table(runs: list[dict]) -> str:
    """A markdown table: zero-shot, then one row per method (mean ± std over its runs)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        groups[method_name(run["config"])].append(run)
    lines = [
        "| method | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    rows = [("zero-shot CLIP", runs, True)] + [(name, group, False) for name, group in sorted(groups.items())]
    for name, group, zero_shot in rows:
        values = np.asarray(_row(group, zero_shot), dtype=float)
        seeds = sorted({run["config"]["seed"] for run in group})
        cells = [_cell(values[:, i], percent=i < 6) for i in range(len(COLUMNS))]
        lines.append(f"| {name} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m fedpurel_app.report <folder with run folders>", file=sys.stderr)
        return 2
    runs = load_runs(Path(argv[0]))
    if not runs:
        print(f"no finished runs (results.json with final metrics) below {argv[0]}", file=sys.stderr)
        return 1
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
