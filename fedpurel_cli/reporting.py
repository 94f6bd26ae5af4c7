"""The report files of finished runs: results.md, results.csv and the plots (``fedpurel report``).

The tables come from :mod:`fedpurel_cli.report`, the plots from :mod:`fedpurel_cli.plots`; this
module, above both, writes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .plots import PLOT_FILES, PlotsUnavailable, write_plots
from .report import CSV_FILE, MARKDOWN_FILE, by_variant, csv_text, load_runs, markdown, table


def write_report(runs: list[dict], folder: Path) -> list[Path]:
    """Write results.md, results.csv and the PNG plots of ``runs`` into ``folder``; return the paths.
    Runs of several PEFT variants get one report each, in ``folder/<variant>/``, and ``folder/results.md``
    holds every variant's table.

    The markdown and CSV are written first; without matplotlib the plots raise
    :class:`fedpurel_cli.plots.PlotsUnavailable` after that.
    """
    variants = by_variant(runs)
    if len(variants) > 1:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        parts = ["# Comparison, per PEFT variant", ""]
        for variant, some in variants.items():
            parts += [f"## {variant}", "", table(some), "", f"Plots and CSV: [{variant}/]({variant}/results.md)", ""]
        (folder / MARKDOWN_FILE).write_text("\n".join(parts))
        paths = [folder / MARKDOWN_FILE]
        for variant, some in variants.items():
            paths += _write_one_report(some, folder / variant)
        return paths
    return _write_one_report(runs, folder)


def _write_one_report(runs: list[dict], folder: Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = folder / MARKDOWN_FILE, folder / CSV_FILE
    md_path.write_text(markdown(runs, PLOT_FILES))
    csv_path.write_text(csv_text(runs, relative_to=folder))
    return [md_path, csv_path, *write_plots(runs, folder)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedpurel report", description="Tables of finished runs; with --write-to, their report files."
    )
    parser.add_argument("folder", help="folder with run folders (every results.json below it is read)")
    parser.add_argument("--write-to", metavar="FOLDER", help="also write results.md, results.csv and plots there")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        print(f"not a folder: {args.folder}", file=sys.stderr)
        return 2
    runs = load_runs(Path(args.folder))
    if not runs:
        print(f"no finished runs (results.json with final metrics) below {args.folder}", file=sys.stderr)
        return 1
    for variant, some in by_variant(runs).items():
        print(f"{variant}:\n{table(some)}")
    if args.write_to:
        try:
            paths = write_report(runs, Path(args.write_to))
        except PlotsUnavailable as error:
            print(f"{error} (results.md and results.csv are written)", file=sys.stderr)
            return 1
        print("wrote " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
