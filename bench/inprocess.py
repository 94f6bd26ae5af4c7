"""A plain in-process FedPuReL loop: the same client computations as the Flower app,
without Flower (no messages, no Ray). Used to compare methods quickly and to
measure the framework's overhead.

    python bench/inprocess.py --methods promptfl,fedpurel --seeds 0,1 --clients 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedpurel_app import task  # noqa: E402
from fedpurel_app.config import RunConfig, parse_run_config  # noqa: E402
from fedpurel_app.methods import build_method, method_class  # noqa: E402
from fedpurel_app.metrics import pm_summary  # noqa: E402
from fedpurel_app.training import predict, seeded_generator, train_global  # noqa: E402


def _sample(cfg: RunConfig, rnd: int, num_clients: int) -> list[int]:
    if rnd == 1 and cfg.all_clients_first_round:
        return list(range(num_clients))
    size = max(1, int(round(num_clients * cfg.fraction_train)))
    rng = np.random.default_rng([cfg.seed, rnd])
    return sorted(int(i) for i in rng.choice(num_clients, size=size, replace=False))


def run_inprocess(cfg: RunConfig, num_clients: int) -> dict:
    """Stage 1 then the `post` personalization phase of ``cfg.method``; GM/PM summaries and timings."""
    t0 = time.perf_counter()
    model = task.build_model(cfg)
    counts = task.class_counts(cfg)
    test = task.global_test_set(cfg)
    clients = [task.client_feature_sets(cfg, k, num_clients) for k in range(num_clients)]
    setup_s = time.perf_counter() - t0
    zero_shot = task.evaluate_zero_shot(cfg, test, counts)
    kind = method_class(cfg.method)
    methods = [build_method(cfg, counts if kind.needs_prior else None) for _ in range(num_clients)]
    initial_phi_k = model.private_state()
    phi_g = model.global_state()
    phi_k: list[dict | None] = [None] * num_clients

    def load(k: int) -> None:
        model.load_global_state(phi_g)
        model.load_private_state(phi_k[k] if phi_k[k] is not None else initial_phi_k)

    history, gm = [], zero_shot
    for rnd in range(1, cfg.num_rounds + 1 if kind.trains_global else 1):
        updates, weights, conflict = [], [], []
        for k in _sample(cfg, rnd, num_clients):
            load(k)
            stats = train_global(model, clients[k][0], task.stage1_options(cfg), cfg.local_epochs,
                                 cfg.batch_size, seeded_generator(cfg.seed, 1, rnd, k), methods[k])
            if kind.stage1_trains_private:
                phi_k[k] = model.private_state()
            updates.append(model.global_state())
            weights.append(len(clients[k][0]))
            conflict.append(stats.means().get("conflict-rate", float("nan")))
        total = float(sum(weights))
        phi_g = {key: sum(u[key] * (w / total) for u, w in zip(updates, weights)) for key in phi_g}
        model.load_global_state(phi_g)
        gm = task.evaluate_global(cfg, model, test, counts)
        history.append({"round": rnd, "gm_all": gm["all"], "gm_few": gm["few"],
                        "conflict": float(np.mean(conflict))})
    if kind.personal_phase and kind.trains_global:
        for step in range(1, cfg.personal_rounds + 1):
            for k in range(num_clients):
                load(k)
                methods[k].personalize(model, clients[k][0], seeded_generator(cfg.seed, 2, cfg.num_rounds + step, k),
                                       first=phi_k[k] is None, precision=task.precision(cfg))
                phi_k[k] = model.private_state()
    preds, gpreds, labels = [], [], []
    for k in range(num_clients):
        load(k)
        test_k = clients[k][1]
        personal = predict(model, test_k.features, phi_k[k] is not None, personal_logits=methods[k].personal_logits)
        preds.append((personal if kind.trains_global else test_k.zero_shot_logits.argmax(-1)).cpu().numpy())
        gpreds.append(predict(model, test_k.features).cpu().numpy())
        labels.append(test_k.labels.cpu().numpy())
    pm = pm_summary(preds, labels, counts, cfg.many_threshold, cfg.few_threshold)
    pm_global = pm_summary(gpreds, labels, counts, cfg.many_threshold, cfg.few_threshold)
    return {
        "zero_shot": zero_shot, "gm": gm, "pm": pm, "pm_global_all": pm_global["all"],
        "history": history, "setup_s": setup_s, "total_s": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (TOML value)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds to sweep (overrides seed)")
    parser.add_argument("--methods", default="", help="comma-separated methods to sweep (overrides method)")
    parser.add_argument("--history", action="store_true", help="also print the per-round GM history")
    parser.add_argument("--per-class", action="store_true", help="also print per-class GM accuracies")
    args = parser.parse_args()
    import tomllib

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = tomllib.loads("\n".join(f"{kv.split('=', 1)[0]} = {kv.split('=', 1)[1]}" for kv in args.set))
    seeds = [int(s) for s in args.seeds.split(",") if s] or [None]
    names = [m for m in args.methods.split(",") if m] or [None]
    keys = ("all", "many", "medium", "few", "balancedness")
    for seed in seeds:
        for name in names:
            run = dict(overrides)
            if seed is not None:
                run["seed"] = seed
            if name is not None:
                run["method"] = name
            cfg = parse_run_config(run)
            torch.manual_seed(cfg.seed)
            out = run_inprocess(cfg, args.clients)
            record = {
                "seed": cfg.seed, "method": cfg.method,
                "zero_shot": {k: out["zero_shot"][k] for k in keys},
                "gm": {k: out["gm"][k] for k in keys},
                "pm_all": out["pm"]["all"], "pm_global_all": out["pm_global_all"],
                "gm_last10": {k: float(np.mean([h[f"gm_{k}"] for h in out["history"][-10:]])) for k in ("all", "few")},
                "total_s": round(out["total_s"], 1), "setup_s": round(out["setup_s"], 1),
            }
            if args.per_class:
                record["zero_shot_per_class"] = out["zero_shot"]["per_class"]
                record["gm_per_class"] = out["gm"]["per_class"]
            if args.history:
                record["history"] = out["history"]
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
