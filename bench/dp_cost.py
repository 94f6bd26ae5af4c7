"""The accuracy cost of client-level DP on the embedded default: FedPuReL against PromptFL.

Every cell is an in-process run (bench/inprocess.py: the Flower app's clipping, release and
accounting, without Flower) of ``--preset`` (configs/embedded-dp.toml: the embedded default,
``mnist-animals-blur`` on ``fedpurel-tiny``, with DP on) on ``--clients`` clients, with
``dp.noise-multiplier`` set to each of ``--noise`` (0: DP off, the embedded default itself), for
each method and seed. Prints one table row per (method, noise) with the epsilon of the setting
and the final GM All / Many / Few / balancedness (the worst class) and PM All, mean (and
spread) over the seeds, then the change against no DP and the methods' difference, and writes
a PNG plot to ``--plot``. ``--jobs`` runs cells side by side, each process with ``--threads``
torch threads (the results do not depend on it: every run is seeded).

    python bench/dp_cost.py --jobs 2 --plot docs/img/dp_cost.png         # the README's table and plot
    python bench/dp_cost.py --norms 6 --jobs 2 --set personalize.rounds=0   # choose dp.clipping-norm
    python bench/dp_cost.py --epsilon --noise 1,2,4,6,8                  # the epsilons, no runs
    python bench/dp_cost.py --noise 0,1 --seeds 0 --methods fedpurel --set train.rounds=5

``--norms R`` runs R Stage-1 rounds of the embedded default (DP off) per method and seed and
prints the quantiles of the unclipped update norms ||phi_g^k - phi_g|| instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, parse_sets, run_cfg  # noqa: E402
from inprocess import run_inprocess, sample  # noqa: E402

from fedpurel_cli import overrides as preset_overrides  # noqa: E402

KEYS = ("all", "many", "few", "balancedness")
LABELS = {"all": "GM All", "many": "GM Many", "few": "GM Few", "balancedness": "GM worst class", "pm": "PM All"}


def run_config(preset: str, sets: dict, method: str, seed: int, noise: float | None) -> dict:
    """The preset, then ``--set``, then this cell's method, seed and noise (None or 0: DP off)."""
    flat = {**preset_overrides.merge([preset]), **sets, "method.name": method, "seed": seed}
    if noise:
        flat.update({"dp.enabled": True, "dp.noise-multiplier": float(noise), "dp.target-epsilon": 0.0})
    else:
        flat["dp.enabled"] = False
    flat.setdefault("output-dir", tempfile.mkdtemp(prefix="fedpurel-dp-cost-"))
    flat.setdefault("track.tensorboard", False)  # no event files or per-class images: faster, same results
    return flat


def _threads(count: int) -> None:
    if count > 0:
        torch.set_num_threads(count)


def pool_map(fn, cells: list[tuple], jobs: int, threads: int):
    """``fn(*cell)`` for every cell, ``jobs`` processes side by side (each with ``threads`` torch
    threads), yielded as they finish; in this process when ``jobs`` is 1."""
    if jobs <= 1:
        for cell in cells:
            yield fn(*cell)
        return
    with ProcessPoolExecutor(max_workers=jobs, initializer=_threads, initargs=(threads,)) as pool:
        for future in as_completed([pool.submit(fn, *cell) for cell in cells]):
            yield future.result()


def one_run(flat: dict, clients: int) -> dict:
    cfg = run_cfg(flat)
    torch.manual_seed(cfg.seed)
    out = run_inprocess(cfg, clients)
    final = out["results"]["final"]
    privacy = out["results"].get("privacy")
    return {
        "method": cfg.method.name,
        "seed": cfg.seed,
        "noise_multiplier": privacy["noise_multiplier"] if privacy else 0.0,
        "clipping_norm": cfg.dp.clipping_norm if privacy else None,
        "epsilon": privacy["epsilon"] if privacy else None,
        "delta": privacy["delta"] if privacy else None,
        "gm": {k: final["gm"][k] for k in KEYS},
        "gm_per_class": final["gm"]["per_class"],
        "pm": final["pm"]["all"],
        "zero_shot": {k: out["results"]["zero_shot"]["gm"][k] for k in KEYS},
        "seconds": round(out["total_s"], 1),
        "clients": clients,
        "results": str(Path(out["run_dir"]) / "results.json"),
    }


def cell_stats(runs: list[dict]) -> dict[str, tuple[float, float]]:
    """(mean, spread) per metric over the seeds; the spread is the sample std (0 for one seed)."""
    values = {k: [r["gm"][k] for r in runs] for k in KEYS} | {"pm": [r["pm"] for r in runs]}
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in values.items()}


def setting_label(noise: float, epsilon: float | None) -> str:
    return "no DP" if not noise else f"z={noise:g}\neps={epsilon:.3g}"


def table(records: list[dict], noises: list[float], methods: list[str]) -> str:
    head = f"{'method':<9} {'z':>5} {'epsilon':>8}  " + "  ".join(f"{LABELS[k]:>14}" for k in (*KEYS, "pm"))
    lines = [
        "final accuracy (%), mean +- std over seeds; epsilon at the run's delta; "
        "worst class = GM balancedness (min per-class accuracy)",
        head,
    ]
    for method in methods:
        for noise in noises:
            runs = [r for r in records if r["method"] == method and r["noise_multiplier"] == float(noise)]
            if not runs:
                continue
            stats = cell_stats(runs)
            eps = "-" if runs[0]["epsilon"] is None else f"{runs[0]['epsilon']:.3g}"
            cells = "  ".join(f"{100 * m:7.1f} +- {100 * s:4.1f}" for m, s in (stats[k] for k in (*KEYS, "pm")))
            lines.append(f"{method:<9} {noise:>5g} {eps:>8}  {cells}")
    seeds = sorted({r["seed"] for r in records})
    zs = records[0]["zero_shot"]
    lines.append(
        f"seeds {seeds}; zero-shot GM All {100 * zs['all']:.1f} Few {100 * zs['few']:.1f} "
        f"worst class {100 * zs['balancedness']:.1f}"
    )
    return "\n".join(lines)


def cost_table(records: list[dict], noises: list[float], methods: list[str]) -> str:
    """The cost of DP: each setting's mean minus the same method's no-DP mean (points), and the
    methods' difference (the first method minus each other one) at every setting."""
    panels = (*KEYS, "pm")

    def means(method: str, noise: float) -> dict[str, float] | None:
        runs = [r for r in records if r["method"] == method and r["noise_multiplier"] == float(noise)]
        return {k: m for k, (m, _) in cell_stats(runs).items()} if runs else None

    lines = [
        "change against no DP (points; mean over seeds)",
        f"{'method':<9} {'z':>5}  " + "  ".join(f"{LABELS[k]:>14}" for k in panels),
    ]
    for method in methods:
        base = means(method, 0.0)
        for noise in noises:
            cell = means(method, noise)
            if not noise or base is None or cell is None:
                continue
            lines.append(
                f"{method:<9} {noise:>5g}  " + "  ".join(f"{100 * (cell[k] - base[k]):+14.1f}" for k in panels)
            )
    if len(methods) > 1:
        first = methods[0]
        lines.append(f"{first} minus the other method (points)")
        for other in methods[1:]:
            for noise in noises:
                a, b = means(first, noise), means(other, noise)
                if a is None or b is None:
                    continue
                lines.append(
                    f"{'-' + other:<9} {noise:>5g}  " + "  ".join(f"{100 * (a[k] - b[k]):+14.1f}" for k in panels)
                )
    return "\n".join(lines)


def plot(records: list[dict], noises: list[float], methods: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilon = {r["noise_multiplier"]: r["epsilon"] for r in records}
    x = np.arange(len(noises))
    labels = [setting_label(z, epsilon.get(float(z))) for z in noises]
    panels = (*KEYS, "pm")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharey=False)
    zs = records[0]["zero_shot"]
    for ax, key in zip(axes, panels, strict=True):
        for method, marker in zip(methods, "os^v", strict=False):
            means, stds = [], []
            for z in noises:
                runs = [r for r in records if r["method"] == method and r["noise_multiplier"] == float(z)]
                m, s = cell_stats(runs)[key] if runs else (np.nan, 0.0)
                means.append(100 * m)
                stds.append(100 * s)
            ax.errorbar(x, means, yerr=stds, marker=marker, capsize=3, label=method)
        if key in zs:
            ax.axhline(100 * zs[key], color="grey", ls=":", lw=1, label="zero-shot")
        ax.set_title(LABELS[key])
        ax.set_xticks(x, labels, fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7)
    seeds = sorted({r["seed"] for r in records})
    fig.suptitle(
        f"Accuracy cost of client-level DP (embedded default, {records[0].get('clients', '')} clients, "
        f"C={next((r['clipping_norm'] for r in records if r['clipping_norm']), '-')}, "
        f"delta={next((r['delta'] for r in records if r['delta']), '-')}, {len(seeds)} seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def update_norms(flat: dict, clients: int) -> dict:
    """The unclipped update norms of every Stage-1 round of one run (DP off)."""
    cfg = run_cfg(flat)
    torch.manual_seed(cfg.seed)
    rounds: list[list[float]] = []
    run_inprocess(cfg, clients, norms=rounds)
    return {"method": cfg.method.name, "seed": cfg.seed, "rounds": rounds}


def norms(args: argparse.Namespace, sets: dict, methods: list[str], seeds: list[int]) -> None:
    cells = [
        (run_config(args.preset, {**sets, "train.rounds": args.norms}, method, seed, None), args.clients)
        for method in methods
        for seed in seeds
    ]
    runs = list(pool_map(update_norms, cells, args.jobs, args.threads))
    for method in methods:
        pooled = []
        for run in sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"]):
            rounds = run["rounds"]
            pooled += [n for r in rounds for n in r]
            print(
                json.dumps(
                    {"method": method, "seed": run["seed"], "median_per_round": [float(np.median(r)) for r in rounds]}
                )
            )
        q = np.quantile(pooled, [0.1, 0.25, 0.5, 0.75, 0.9])
        print(
            f"{method}: {len(pooled)} updates, ||Delta_k|| quantiles 10/25/50/75/90 %: "
            + " ".join(f"{v:.4f}" for v in q)
        )


def epsilons(args: argparse.Namespace, sets: dict, noises: list[float]) -> None:
    """Per noise multiplier: the accountant's epsilon of the preset's plan (what a run reports), and
    the epsilon against someone who knows the seeded schedule: the Gaussian mechanism composed over
    the rounds the most sampled client takes part in, and over every round (any seed)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from fedpurel_app.privacy import PrivacyAccountant

    cfg = run_cfg({**preset_overrides.merge([args.preset]), **sets})
    k, rounds = args.clients, cfg.train.rounds
    schedule = [sample(cfg, r, k) for r in range(1, rounds + 1)]
    times = np.bincount([c for s in schedule for c in s], minlength=k)

    def composed(z: float, count: int) -> float:
        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        accountant.compose(dp_accounting.GaussianDpEvent(z / 2), count)
        return float(accountant.get_epsilon(cfg.dp.delta))

    print(
        f"{k} clients, {rounds} rounds, seed {cfg.seed}, delta {cfg.dp.delta:g}; rounds per client "
        f"{int(times.min())}-{int(times.max())}"
    )
    print(f"{'z':>6} {'accountant':>11} {'known schedule, most sampled':>29} {'every round':>12}")
    for z in noises:
        if not z:
            continue
        accountant = PrivacyAccountant(z, k, cfg.dp.delta)
        for s in schedule:
            accountant.add_round(len(s))
        print(
            f"{z:>6g} {accountant.epsilon():>11.3f} {composed(z, int(times.max())):>29.3f} {composed(z, rounds):>12.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=str(ROOT / "configs" / "embedded-dp.toml"))
    parser.add_argument("--noise", default="0,0.5,1,2", help="noise multipliers z; 0 = DP off")
    parser.add_argument("--methods", default="fedpurel,promptfl")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--clients", type=int, default=20, help="NUM_SUPERNODES of scripts/run.sh")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value, after the preset")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: as the app's actors)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (processes of --threads threads)")
    parser.add_argument("--plot", default="", help="write the PNG plot here")
    parser.add_argument("--json", default="", help="append every run's record (JSON lines) here")
    parser.add_argument("--from-json", default="", help="no runs: the table and plot of these records")
    parser.add_argument("--norms", type=int, default=0, help="print the update-norm quantiles of this many rounds")
    parser.add_argument("--epsilon", action="store_true", help="no runs: the epsilons of --noise on the preset's plan")
    args = parser.parse_args()
    _threads(args.threads)
    sets = parse_sets(args.set)
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    noises = [float(z) for z in args.noise.split(",") if z]
    if args.norms:
        norms(args, sets, methods, seeds)
        return
    if args.epsilon:
        epsilons(args, sets, noises)
        return
    if args.from_json:
        records = [json.loads(line) for line in Path(args.from_json).read_text().splitlines() if line.strip()]
    else:
        cells = [
            (run_config(args.preset, sets, method, seed, noise), args.clients)
            for seed in seeds
            for noise in noises
            for method in methods
        ]
        records = []
        for record in pool_map(one_run, cells, args.jobs, args.threads):
            records.append(record)
            print(
                f"[dp_cost] {record['method']} seed {record['seed']} z {record['noise_multiplier']:g}: "
                f"eps {record['epsilon']} GM all {record['gm']['all']:.3f} few {record['gm']['few']:.3f} "
                f"PM {record['pm']:.3f} ({record['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps(record) + "\n")
    print(table(records, noises, methods))
    print(cost_table(records, noises, methods))
    if args.plot:
        plot(records, noises, methods, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
