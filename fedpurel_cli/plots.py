"""PNG plots of a comparison of methods (matplotlib, Agg; the optional extra ``report``).

- ``accuracy_per_round.png``: GM All and PM All per round, one line per method (mean over seeds);
- ``many_medium_few.png``: Many / Medium / Few of each method's final model, GM and PM (mean ± std);
- ``per_class_vs_count.png``: final per-class GM accuracy against the class's training count (log x);
- ``conflict_rate.png``: purification conflict rate per round, for the methods that record it.

A plot with nothing to show is still written, with a note saying so.
matplotlib is imported only here, inside :func:`write_plots`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from .report import METHODS, METRIC, Group, groups, nan_mean, reported, summarize

ZERO_SHOT_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def round_series(runs: list[dict], value: Callable[[dict], float | None]) -> tuple[list[int], list[float]]:
    """Per round number, the mean over ``runs`` of ``value(round entry)`` (None = no value that round)."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for entry in run.get("rounds", []):
            number = value(entry)
            if number is not None:
                by_round[entry["round"]].append(float(number))
    rounds = sorted(by_round)
    return rounds, [sum(by_round[r]) / len(by_round[r]) for r in rounds]


def accuracy_of(model: str) -> Callable[[dict], float | None]:
    """A round entry's All accuracy of ``model`` ("gm" or "pm") in percent, or None."""

    def value(entry: dict) -> float | None:
        accuracy = (entry.get(model) or {}).get("all")
        return None if accuracy is None else 100.0 * accuracy

    return value


def conflict_rate(entry: dict) -> float | None:
    """A round entry's purification conflict rate, or None."""
    return (entry.get("train") or {}).get("conflict-rate")


def accuracy_by_count(runs: list[dict], zero_shot: bool) -> tuple[list[int], list[float]]:
    """Final (or zero-shot) per-class GM accuracy in percent, averaged over classes and runs of equal train count.

    Runs without ``class_counts``, or whose per-class list does not match it, are left out.
    """
    by_count: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        counts = run.get("class_counts") or []
        source = run.get("zero_shot", {}) if zero_shot else run["final"]
        per_class = (source.get("gm") or {}).get("per_class") or []
        if not counts or len(counts) != len(per_class):
            continue
        for count, accuracy in zip(counts, per_class, strict=True):
            if count > 0 and accuracy is not None:
                by_count[int(count)].append(100.0 * accuracy)
    counts = sorted(by_count)
    return counts, [nan_mean(by_count[c]) for c in counts]


def colors(method_groups: list[Group]) -> dict[str, str]:
    """One colour per method, fixed by its place in ``METHODS`` (the same in every plot and report)."""
    names = [*METHODS, *(group.name for group in method_groups if group.name not in METHODS)]
    return {group.name: f"C{names.index(group.name) % 10}" for group in method_groups}


def reports(group: Group, model: str) -> bool:
    """Whether any run of the group reports ``model`` ("gm" or "pm")."""
    return any(model in reported(run) for run in group.runs)


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _note_if_empty(ax, what: str) -> None:
    if ax.has_data():
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no {what} in these runs", ha="center", va="center", transform=ax.transAxes)


def draw_accuracy_per_round(fig, runs: list[dict]) -> None:
    """GM All and PM All per round, mean over seeds, with the zero-shot level dashed."""
    zero_shot, *methods = groups(runs)
    zero_shot_summary = summarize(runs)[0]
    color = colors(methods)
    for ax, model, title in zip(fig.subplots(1, 2), ("gm", "pm"), ("GM", "PM"), strict=True):
        level, _, seeds = zero_shot_summary.values[f"{model}_all"]
        if seeds:
            ax.axhline(level, label=zero_shot.name, **ZERO_SHOT_STYLE)
        for group in methods:
            rounds, values = round_series(group.runs, accuracy_of(model))
            if rounds and reports(group, model):
                ax.plot(rounds, values, marker="o", markersize=2.5, color=color[group.name], label=group.name)
        ax.set(title=f"{title} All per round", xlabel="round", ylabel="accuracy (%)")
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
        _note_if_empty(ax, f"{title} per round")


def draw_many_medium_few(fig, runs: list[dict]) -> None:
    """Grouped bars Many / Medium / Few per method (mean ± std over seeds), GM and PM."""
    summaries = summarize(runs)
    for ax, model in zip(fig.subplots(2, 1), ("gm", "pm"), strict=True):
        keys = [f"{model}_{group}" for group in ("many", "medium", "few")]
        shown = [s for s in summaries if any(s.values[key][2] for key in keys)]
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            means = [s.values[key][0] for s in shown]
            stds = [s.values[key][1] for s in shown]
            positions = [x + (i - 1) * width for x in range(len(shown))]
            label = METRIC[key].label.removeprefix("PM ")
            ax.bar(positions, means, width, yerr=stds, capsize=2, label=label, color=f"C{i}")
        ax.set_xticks(range(len(shown)), [s.name for s in shown], rotation=25, ha="right", fontsize=8)
        ax.set(title=f"{model.upper()}: Many / Medium / Few (final)", ylabel="accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        _note_if_empty(ax, f"{model.upper()} group accuracies")


def draw_per_class_vs_count(fig, runs: list[dict]) -> None:
    """Final per-class GM accuracy against the class's long-tailed training count (log x)."""
    zero_shot, *methods = groups(runs)
    color = colors(methods)
    ax = fig.subplots()
    counts, values = accuracy_by_count(zero_shot.runs, zero_shot=True)
    if counts:
        ax.plot(counts, values, marker="s", markersize=3, label=zero_shot.name, **ZERO_SHOT_STYLE)
    for group in methods:
        counts, values = accuracy_by_count(group.runs, zero_shot=False)
        if counts and reports(group, "gm"):
            ax.plot(counts, values, marker="o", markersize=3, color=color[group.name], label=group.name, alpha=0.85)
    if ax.has_data():
        ax.set_xscale("log")
    ax.set(
        title="Per-class GM accuracy (final) against training count",
        xlabel="training samples of the class (all clients, log scale)",
        ylabel="accuracy (%), mean over classes of equal count and seeds",
    )
    ax.grid(alpha=0.3, which="both")
    _note_if_empty(ax, "per-class accuracies with class_counts")


def draw_conflict_rate(fig, runs: list[dict]) -> None:
    """Fraction of purification units whose task and alignment gradients conflicted, per round."""
    _, *methods = groups(runs)
    color = colors(methods)
    ax = fig.subplots()
    for group in methods:
        rounds, values = round_series(group.runs, conflict_rate)
        if rounds:
            ax.plot(rounds, values, marker="o", markersize=2.5, color=color[group.name], label=group.name)
    ax.set(title="Purification conflict rate per round (mean over seeds)", xlabel="round", ylabel="conflict rate")
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    _note_if_empty(ax, "conflict rate")


DRAWERS = {
    "accuracy_per_round.png": (draw_accuracy_per_round, (11, 4.2)),
    "many_medium_few.png": (draw_many_medium_few, (10, 8)),
    "per_class_vs_count.png": (draw_per_class_vs_count, (8, 5)),
    "conflict_rate.png": (draw_conflict_rate, (8, 4.5)),
}
PLOT_FILES = tuple(DRAWERS)


def write_plots(runs: list[dict], folder: Path) -> list[Path]:
    """Draw every plot of ``PLOT_FILES`` for ``runs`` into ``folder`` as PNG; return the paths."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise PlotsUnavailable("the plots need matplotlib: .venv/bin/pip install -e '.[report]'") from error

    paths = []
    for name in PLOT_FILES:
        draw, size = DRAWERS[name]
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig, runs)
        path = Path(folder) / name
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
