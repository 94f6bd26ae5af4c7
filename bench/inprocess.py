"""A plain in-process FedPuReL loop: the Flower app's computations, without Flower.

No messages, no Ray, no SuperLink: one :class:`fedpurel_app.client.Client` per
message, as the ClientApp makes one, with a dict as each node's memory (its
``context.state``), and the server's :class:`fedpurel_app.server.ServerRun`
executing the method's round plan step by step, as the ServerApp does. What
the Flower app adds is replaced by the same arithmetic:

- client sampling: ``FedPuReLStrategy.sample`` (seeded by (seed, round), nodes in
  partition order; all of them in round 1 with ``train.all-clients-first-round``);
- aggregation: Flower's FedAvg (``aggregate_arrayrecords`` / ``aggregate_metricrecords``):
  numpy float32 arrays times ``n_k / sum n``, summed in partition order;
- PM metrics from the clients' evaluations in partition order;
- with ``dp.enabled``: every update clipped to ``dp.clipping-norm`` (``fedpurel_app.privacy.clip_update``,
  what Flower's ``fixedclipping_mod`` does on a client), the release ``private_mean`` over the sampled
  clients, and the accounting ``ServerRun.start_privacy`` / ``privacy_release``, as the ServerApp
  (epsilon is exactly the app's; the noise is random, so phi_g, GM and PM are not).

So the global model, GM and every per-round record match a Flower simulation
of the same run config with ``NUM_SUPERNODES`` = ``--clients`` (the clients
run on one torch thread, as Ray's actors do: ``--threads 1``); PM matches up to
the order of floating-point sums. Writes the run's results.json like the app
(``output-dir``: a temporary folder unless set). Used to compare methods
quickly and to measure the framework's overhead.

    python bench/inprocess.py --methods promptfl,fedpurel --seeds 0,1 --clients 20
    python bench/inprocess.py --set train.rounds=2 --set personalize.rounds=1 --clients 4 --history
    python bench/inprocess.py --compare outputs/<run>/results.json    # check against a Flower run
    python bench/inprocess.py --set dp.enabled=true --set dp.noise-multiplier=1.0    # with client-level DP
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, node, parse_sets, run_cfg  # noqa: E402

from fedpurel_app.client import Client, DictMemory, node_state_dir  # noqa: E402
from fedpurel_app.config import RunConfig  # noqa: E402
from fedpurel_app.privacy import clip_update, private_mean, update_norm  # noqa: E402
from fedpurel_app.protocol import Instruction, TrainReply  # noqa: E402
from fedpurel_app.server import ServerRun  # noqa: E402


def sample(cfg: RunConfig, server_round: int, num_clients: int) -> list[int]:
    """``FedPuReLStrategy.sample`` over nodes in partition order."""
    if server_round == 1 and cfg.train.all_clients_first_round:
        return list(range(num_clients))
    size = max(1, int(round(num_clients * cfg.train.fraction)))
    rng = np.random.default_rng([cfg.seed, server_round])
    picked = rng.choice(num_clients, size=min(size, num_clients), replace=False)
    return [int(i) for i in sorted(picked)]


def fedavg(results: list[tuple[dict[str, torch.Tensor], TrainReply]]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flower's FedAvg of the replies, in their (partition) order: phi_g and the train metrics."""
    weights = [reply.num_examples for _, reply in results]
    total = sum(weights)
    factors = [w / total for w in weights]
    arrays: dict[str, np.ndarray] = {}
    metrics: dict[str, float] = {}
    for (phi_g, reply), factor in zip(results, factors, strict=True):
        for key, value in phi_g.items():
            value = value.detach().cpu().numpy()
            arrays[key] = value * factor if key not in arrays else arrays[key] + value * factor
        for key, value in reply.to_metrics().items():
            if key in ("num-examples", "partition-id"):  # the weight; an identity, dropped by the strategy
                continue
            metrics[key] = value * factor if key not in metrics else metrics[key] + value * factor
    return {key: torch.from_numpy(np.asarray(value)) for key, value in arrays.items()}, metrics


def run_inprocess(
    cfg: RunConfig, num_clients: int, keep_node_state: bool = False, norms: list[list[float]] | None = None
) -> dict:
    """Execute ``cfg``'s round plan on ``num_clients`` in-process clients; results and timings.
    ``norms``: when a list, each Stage-1 round appends the sampled clients' unclipped update norms."""
    t0 = time.perf_counter()
    run = ServerRun(cfg, ROOT)
    nodes = [node(k, num_clients) for k in range(num_clients)]
    memories = [DictMemory() for _ in range(num_clients)]
    prior = run.class_counts_for_messages()
    setup_s = time.perf_counter() - t0
    timings = {"train": 0.0, "personalize": 0.0, "evaluate": 0.0, "gm": 0.0}

    dp = cfg.dp if cfg.dp.enabled else None
    noise_multiplier = run.start_privacy(num_clients) if dp is not None else 0.0

    def client(k: int, server_round: int, evaluate: bool = False, train: bool = False) -> Client:
        clipping = dp.clipping_norm if train and dp is not None else None
        return Client(cfg, nodes[k], memories[k], Instruction(server_round, run.tag, prior, evaluate, clipping))

    def evaluate_pm(server_round: int) -> dict | None:
        start = time.perf_counter()
        replies = [client(k, server_round).evaluate(run.phi_g) for k in range(num_clients)]
        timings["evaluate"] += time.perf_counter() - start
        return run.pm([reply.evaluation for reply in replies])

    history = []
    for index, step in enumerate(run.plan.steps):
        gm = pm = train = privacy = None
        sampled: list[int] = []
        if step.phase == "zero-shot" and step.pm:
            pm = evaluate_pm(0)
        if step.train:
            start = time.perf_counter()
            sampled = sample(cfg, step.round, num_clients)
            replies = [client(k, step.round, train=True).train(run.phi_g) for k in sampled]
            if norms is not None:
                norms.append([update_norm(phi, run.phi_g) for phi, _ in replies])
            if dp is not None:  # the clients' fixedclipping_mod, then the strategy's release and accounting
                replies = [(clip_update(phi, run.phi_g, dp.clipping_norm), reply) for phi, reply in replies]
                _, train = fedavg(replies)
                run.phi_g = private_mean(
                    run.phi_g, [phi for phi, _ in replies], len(sampled), noise_multiplier, dp.clipping_norm
                )
                privacy = run.privacy_release(len(sampled))
            else:
                run.phi_g, train = fedavg(replies)
            train["clients"] = len(sampled)
            timings["train"] += time.perf_counter() - start
        if step.personalize:
            start = time.perf_counter()
            evaluate = step.pm and step.personalize == "all"
            targets = sampled if step.personalize == "sampled" else range(num_clients)
            replies = [client(k, step.round, evaluate).personalize(run.phi_g) for k in targets]
            if evaluate:
                pm = run.pm([reply.evaluation for reply in replies])
            timings["personalize"] += time.perf_counter() - start
        if step.gm and step.phase != "zero-shot":
            start = time.perf_counter()
            gm = run.evaluate_gm()
            timings["gm"] += time.perf_counter() - start
        if step.pm and step.phase != "zero-shot" and step.personalize != "all":
            pm = evaluate_pm(step.round)
        run.record(step, gm=gm, pm=pm, train=train, privacy=privacy)
        run.checkpoint(index, step)
        if step.phase != "zero-shot":
            history.append(
                {
                    "round": step.round,
                    "phase": step.phase,
                    "gm_all": gm and gm["all"],
                    "gm_few": gm and gm["few"],
                    "pm_all": pm and pm["all"],
                    "conflict": (train or {}).get("conflict-rate"),
                    **({"epsilon": privacy["epsilon"]} if privacy else {}),
                }
            )
    run.finish()
    if not keep_node_state:  # the nodes' state folders of this run (in the cache folder)
        shutil.rmtree(Path(node_state_dir(cfg, nodes[0], run.tag)).parent, ignore_errors=True)
    return {
        "results": run.recorder.data,
        "run_dir": str(run.run_dir),
        "history": history,
        "setup_s": setup_s,
        "total_s": time.perf_counter() - t0,
        "timings": timings,
    }


def compare(ours: dict, theirs: dict) -> list[str]:
    """Differences between two results.json: GM (and everything but PM) must be equal, PM close."""
    problems = []

    def gm_of(results):
        return [(r["round"], r["phase"], r.get("gm")) for r in results["rounds"]]

    if ours["zero_shot"]["gm"] != theirs["zero_shot"]["gm"]:
        problems.append("zero-shot GM differs")
    if gm_of(ours) != gm_of(theirs):
        problems += [f"round {a[0]}: GM differs" for a, b in zip(gm_of(ours), gm_of(theirs), strict=False) if a != b]
    for a, b in zip(ours["rounds"], theirs["rounds"], strict=False):
        if a.get("train", {}).get("clients") != b.get("train", {}).get("clients"):
            problems.append(f"round {a['round']}: sampled clients differ")
        for key in ("all", "all_weighted", "few"):
            pa, pb = (a.get("pm") or {}).get(key), (b.get("pm") or {}).get(key)
            if (pa is None) != (pb is None) or (pa is not None and abs(pa - pb) > 1e-9):
                problems.append(f"round {a['round']}: PM {key} {pa} != {pb}")
    if len(ours["rounds"]) != len(theirs["rounds"]):
        problems.append(f"{len(ours['rounds'])} rounds != {len(theirs['rounds'])}")
    return problems


def compare_phi_g(ours: Path, theirs: Path) -> list[str]:
    """The final phi_g of two run folders must be bitwise equal."""
    from safetensors.torch import load_file

    a, b = (load_file(str(folder / "phi_g.safetensors")) for folder in (ours, theirs))
    if a.keys() != b.keys():
        return [f"phi_g keys {sorted(a)} != {sorted(b)}"]
    return [f"phi_g['{key}'] differs" for key in a if not torch.equal(a[key], b[key])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20, help="number of clients (NUM_SUPERNODES of the app)")
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (TOML value), repeatable")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1: as the app's Ray actors; 0: torch default)"
    )
    parser.add_argument("--seeds", default="", help="comma-separated seeds to sweep (overrides seed)")
    parser.add_argument("--methods", default="", help="comma-separated methods to sweep (overrides method.name)")
    parser.add_argument("--history", action="store_true", help="also print the per-round history")
    parser.add_argument("--per-class", action="store_true", help="also print per-class GM accuracies")
    parser.add_argument("--compare", default="", help="a Flower run's results.json: check this run against it")
    parser.add_argument("--keep-node-state", action="store_true", help="keep the nodes' state folders of the run")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = parse_sets(args.set)
    if args.compare:  # the Flower run's own config (flat dotted keys), but its output-dir
        overrides = {**json.loads(Path(args.compare).read_text())["config"], **overrides}
        overrides.pop("output-dir", None)
        overrides.pop("resume-from", None)
    if "output-dir" not in overrides:
        overrides["output-dir"] = tempfile.mkdtemp(prefix="fedpurel-inprocess-")
    seeds = [int(s) for s in args.seeds.split(",") if s] or [None]
    names = [m for m in args.methods.split(",") if m] or [None]
    keys = ("all", "many", "medium", "few", "balancedness")
    failed = False
    for seed in seeds:
        for name in names:
            run = dict(overrides)
            if seed is not None:
                run["seed"] = seed
            if name is not None:
                run["method.name"] = name
            cfg = run_cfg(run)
            if cfg.secagg.enabled:  # its masking needs Flower's messages: no in-process stand-in
                sys.exit(
                    "secagg.enabled runs only through Flower (bash scripts/run.sh, a deployment, or "
                    "fedpurel compare --engine flower); the in-process engine has no SecAgg+"
                )
            torch.manual_seed(cfg.seed)
            out = run_inprocess(cfg, args.clients, args.keep_node_state)
            results = out["results"]
            final = results["final"]
            record = {
                "seed": cfg.seed,
                "method": cfg.method.name,
                "peft": cfg.peft.name,
                "clients": args.clients,
                "zero_shot": {k: results["zero_shot"]["gm"][k] for k in keys},
                "gm": {k: final["gm"][k] for k in keys} if "gm" in final else None,
                "pm_all": final.get("pm", {}).get("all"),
                "pm_global_all": final.get("pm", {}).get("global", {}).get("all"),
                "gm_last10": {k: final["gm_last10"][k] for k in ("all", "few")} if "gm_last10" in final else None,
                "total_s": round(out["total_s"], 1),
                "setup_s": round(out["setup_s"], 1),
                "timings_s": {k: round(v, 1) for k, v in out["timings"].items()},
                "results": str(Path(out["run_dir"]) / "results.json"),
            }
            if "privacy" in results:
                record["privacy"] = {
                    k: results["privacy"][k] for k in ("epsilon", "delta", "noise_multiplier", "clipping_norm")
                }
            if args.per_class and "gm" in final:
                record["zero_shot_per_class"] = results["zero_shot"]["gm"]["per_class"]
                record["gm_per_class"] = final["gm"]["per_class"]
            if args.history:
                record["history"] = out["history"]
            print(json.dumps(record), flush=True)
            if args.compare:
                problems = compare(results, json.loads(Path(args.compare).read_text()))
                problems += compare_phi_g(Path(out["run_dir"]), Path(args.compare).parent)
                print(json.dumps({"compare": args.compare, "equal": not problems, "problems": problems[:20]}))
                failed = failed or bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
