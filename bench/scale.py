"""Scale: server cost per round with 100 and 1,000 virtual clients (10 sampled), and one client's round.

Server: ``FedPuReLStrategy`` over a fake grid of N node ids (as tests/test_apps.py),
``train.fraction = 10 / N`` (10 sampled per round, ``train.all-clients-first-round``
off), phi_g of the default prompt variant. Per round it times sampling +
building the 10 train messages (``configure_train``) and aggregating 10 replies
(``aggregate_train``: validation + weighted FedAvg); medians over ``--rounds``
rounds. Both N run in this process, interleaved. The personalization and
evaluation phases address every node, so their message building is timed too.
Memory: tracemalloc peak of Python allocations during the rounds, and this
process's max RSS (resource.getrusage; includes torch and flwr).

Client: one client's Stage-1 round (``train_global``, default config) runs in
a child process (its own max RSS); its time depends on its own n_k only, never
on N: timed on the same client's data cut to n_k = 16, 32, 48 (1, 2, 3 batches).
(The embedded long-tailed training set has 682 images: at most ~170 clients
with 4 images each, so a 1,000-client split of it does not exist.)

    python bench/scale.py [--clients 100,1000] [--sampled 10] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from common import client_inputs, method, model, run_cfg, stage1_options  # noqa: E402

from fedpurel_app.protocol import Instruction  # noqa: E402
from server_app.strategy import FedPuReLStrategy  # noqa: E402

NODE_ID_BASE = 10**6  # node i holds partition i


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def reply(phi: dict, n: int, partition_id: int, request: Message) -> Message:
    metrics = MetricRecord(
        {"num-examples": n, "partition-id": partition_id, "conflict-rate": 0.5, "mean-cosine": 0.1, "task-loss": 1.0}
    )
    return Message(RecordDict({"arrays": ArrayRecord(phi), "metrics": metrics}), reply_to=request)


def server_round(strategy, grid, rnd, arrays, shapes, rng) -> tuple[float, float]:
    start = time.perf_counter()
    messages = list(strategy.configure_train(rnd, arrays, Instruction(rnd), grid))
    t_configure = time.perf_counter() - start
    replies = []
    for i, msg in enumerate(messages):  # built outside the timer: in reality they arrive over the network
        request = Message(msg.content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)
        phi = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}
        replies.append(reply(phi, 10 + i, msg.metadata.dst_node_id - NODE_ID_BASE, request))  # its partition
    start = time.perf_counter()
    strategy.aggregate_train(rnd, replies)
    return t_configure, time.perf_counter() - start


def server(clients: list[int], sampled: int, rounds: int) -> None:
    _, peft = model(run_cfg())
    phi_g = peft.global_state()
    shapes = {k: tuple(v.shape) for k, v in phi_g.items()}
    arrays = ArrayRecord(phi_g)
    rng = np.random.default_rng(0)
    setups = {}
    for n in clients:
        grid = FakeGrid(range(NODE_ID_BASE, NODE_ID_BASE + n))
        strategy = FedPuReLStrategy(
            shapes, fraction_train=sampled / n, all_clients_first_round=False, min_available_nodes=n
        )
        setups[n] = (strategy, grid)
    times = {n: ([], []) for n in clients}
    peaks = {}
    for rnd in range(1, rounds + 2):
        for n, (strategy, grid) in setups.items():
            c, a = server_round(strategy, grid, rnd, arrays, shapes, rng)
            if rnd > 1:  # round 1 is a warm-up
                times[n][0].append(c)
                times[n][1].append(a)
    for n, (strategy, grid) in setups.items():  # memory: one more round under tracemalloc (it slows Python down)
        tracemalloc.start()
        server_round(strategy, grid, rounds + 2, arrays, shapes, rng)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(
        f"server: FedPuReLStrategy, phi_g of the default prompt ({sum(v.numel() for v in phi_g.values())} "
        f"float32), {sampled} sampled per round, {rounds} rounds per N interleaved, medians"
    )
    for n in clients:
        strategy, grid = setups[n]
        assert len(strategy.last_sampled) == sampled
        c, a = statistics.median(times[n][0]), statistics.median(times[n][1])
        start = time.perf_counter()
        everyone = strategy.configure_personalize(arrays, Instruction(rounds + 2), grid)
        t_all = time.perf_counter() - start
        print(
            f"  N={n:>5d}: sampling + {sampled} train messages {1e3 * c:.2f} ms | aggregation of {sampled} "
            f"replies {1e3 * a:.2f} ms | round total {1e3 * (c + a):.2f} ms | tracemalloc peak "
            f"{peaks[n] / 1024:.0f} KiB | messages to all {len(everyone)} nodes (personalize/evaluate) "
            f"{1e3 * t_all:.1f} ms"
        )
    base = clients[0]
    for n in clients[1:]:
        r0 = statistics.median(times[base][0]) + statistics.median(times[base][1])
        r1 = statistics.median(times[n][0]) + statistics.median(times[n][1])
        print(f"  round time N={n} / N={base}: {r1 / r0:.2f}x for {n / base:.0f}x the clients")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  server process max RSS {rss:.0f} MiB (python + torch + flwr + the strategy)")


def client(sizes: list[int], repeats: int) -> None:
    """Child process: one client's Stage-1 round on n_k images; prints JSON."""
    torch.set_num_threads(1)
    from fedpurel_app.data.client import fedlt_split
    from fedpurel_app.inputs import FeatureSet
    from fedpurel_app.training import seeded_generator, train_global

    cfg = run_cfg()
    clip, peft = model(cfg)
    options, objective = stage1_options(cfg, clip), method(cfg)
    sizes_all = [len(t) for t in fedlt_split(cfg.data, cfg.seed, 20).client_train]
    k = max(range(20), key=sizes_all.__getitem__)
    _, data, _ = client_inputs(cfg, clip, k, 20)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start_state = peft.global_state()
    out = {"client": k, "n": len(data), "rss_setup_mib": rss_setup, "times": {}}
    times = {n: [] for n in sizes if n <= len(data)}
    for r in range(repeats + 1):
        for n in times:
            sub = FeatureSet(data.features[:n], data.labels[:n], data.zero_shot_logits[:n])
            peft.load_global_state(start_state)
            start = time.perf_counter()
            train_global(
                peft,
                sub,
                options,
                cfg.train.local_epochs,
                cfg.train.batch_size,
                seeded_generator(cfg.seed, 1, 2, k),
                objective,
            )
            if r:
                times[n].append(time.perf_counter() - start)
    out["times"] = {n: statistics.median(ts) for n, ts in times.items()}
    out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000")
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--client-sizes", default="16,32,48")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.client_sizes.split(",")]
    if args.client_only:
        client(sizes, args.repeats)
        return
    torch.set_num_threads(1)
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as in tests/test_apps.py
        setattr(TaskIdentity, name, value)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)  # no per-round INFO lines to the terminal
    server([int(n) for n in args.clients.split(",")], args.sampled, args.rounds)
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--client-only",
            "--client-sizes",
            args.client_sizes,
            "--repeats",
            str(args.repeats),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg_note = "default config (prompt, tkl, 2 local epochs, batch 16)"
    print(
        f"client: one Stage-1 round, {cfg_note}, largest client of the 20-client split "
        f"(partition {out['client']}, {out['n']} images) cut to n_k images, {args.repeats} repeats, medians"
    )
    times = {int(n): t for n, t in out["times"].items()}
    print("  " + " | ".join(f"n_k={n}: {1e3 * t:.0f} ms" for n, t in times.items()))
    ns = sorted(times)
    per = (times[ns[-1]] - times[ns[0]]) / (ns[-1] - ns[0])
    print(
        f"  ~{1e3 * per:.1f} ms per training image per round (2 epochs), independent of the number of "
        f"clients N; max RSS of the client process {out['rss_mib']:.0f} MiB "
        f"({out['rss_setup_mib']:.0f} MiB after loading the model and its features)"
    )


if __name__ == "__main__":
    main()
