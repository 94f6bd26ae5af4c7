"""One Stage-1 round through SecAgg+ (``secagg.enabled``) against plain FedAvg of the same updates.

The same clients (our ClientApp, in this process) train round 1 twice: once answering the plain
Stage-1 message, whose replies show every client's update, and once inside Flower's SecAgg+
(:func:`server_app.secagg.secure_round`, the ServerApp's own code path), where the server receives
masked vectors only. Local training is seeded by (seed, round, partition), so both see the same
updates.

``python bench/secagg_stage1.py [--clients 5] [--clipping-norm 0.05]`` prints the largest
difference to plain FedAvg (or, with a clipping norm, to :func:`fedpurel_app.privacy.private_mean`
without noise), the bound SecAgg+'s quantization gives, and what the server received.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402

from fedpurel_app import protocol  # noqa: E402
from fedpurel_app.protocol import Instruction  # noqa: E402

LEVELS = 4194304  # secagg.quantization-range's default


class LocalGrid:
    """``send_and_receive`` to in-process nodes (each message copied, as the wire does); keeps every
    reply the server receives."""

    def __init__(self, app, contexts: dict[int, Context]) -> None:
        self.app, self.contexts = app, contexts
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"{time.monotonic_ns()}-{i}"
            msg.content = copy.deepcopy(msg.content)
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        self.received += replies
        return replies


def one_round(run_config: dict, clients: int, clipping_norm: float | None) -> dict:
    """Set up the run, then round 1 (every client) plainly and through SecAgg+; the comparison."""
    from flwr.common.config import unflatten_dict
    from flwr.supercore.task_identity import TaskIdentity

    from client_app import app as client
    from fedpurel_app.config import parse_run_config
    from fedpurel_app.privacy import private_mean, update_norm
    from fedpurel_app.server import ServerRun
    from server_app.secagg import quantization_bound, secure_round
    from server_app.strategy import FedPuReLStrategy

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # messages built outside Flower
        setattr(TaskIdentity, name, value)
    cfg = parse_run_config(unflatten_dict(dict(run_config)))
    run = ServerRun(cfg, ROOT)
    contexts = {
        100 + i: Context(
            run_id=1,
            node_id=100 + i,
            node_config={"partition-id": i, "num-partitions": clients},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for i in range(clients)
    }
    grid = LocalGrid(client.app, contexts)
    phi_g, total_examples = run.phi_g, int(run.counts.sum())
    instruction = Instruction(1, run.tag, run.class_counts_for_messages(), False, clipping_norm)
    strategy = FedPuReLStrategy({k: tuple(v.shape) for k, v in phi_g.items()}, max_examples=total_examples)
    plain = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(phi_g), instruction, grid))
    seen = [
        (m.content[protocol.ARRAYS].to_torch_state_dict(), int(m.content[protocol.METRICS]["num-examples"]))
        for m in plain
    ]
    before = len(grid.received)
    started = time.perf_counter()
    secure = secure_round(
        grid, grid.send_and_receive, list(contexts), phi_g, instruction, cfg.secagg, total_examples, 60.0
    )
    seconds = time.perf_counter() - started
    received = grid.received[before:]
    if clipping_norm:
        expected = private_mean(phi_g, [u for u, _ in seen], clients, 0.0, clipping_norm)
        bound = quantization_bound(clipping_norm, [1] * clients, 1.0, LEVELS)
    else:
        total = sum(w for _, w in seen)
        expected = {
            k: phi_g[k].double() + sum((u[k].double() - phi_g[k].double()) * w for u, w in seen) / total for k in phi_g
        }
        bound = quantization_bound(cfg.secagg.clipping_range, [w for _, w in seen], float(total_examples), LEVELS)
    return {
        "clients": clients,
        "contributors": len(secure.contributors),
        "weights": [w for _, w in seen],
        "update_norms": [update_norm(u, phi_g) for u, _ in seen],
        "max_error": max(float((secure.phi_g[k].double() - expected[k].double()).abs().max()) for k in phi_g),
        "bound": bound,
        "largest_change": max(float((expected[k].double() - phi_g[k].double()).abs().max()) for k in phi_g),
        "largest_update_value": max(float((u[k].double() - phi_g[k].double()).abs().max()) for u, _ in seen for k in u),
        "arrays_received": secure.arrays_received,
        "replies_received": secure.replies,
        "received": received,
        "metrics": secure.metrics,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--clipping-norm", type=float, default=0.0, help="> 0: a DP round (uniform, clipped)")
    args = parser.parse_args()
    run_config = {
        "train.rounds": 1,
        "train.local-epochs": 1,
        "personalize.rounds": 1,
        "data.client-test-size": 20,
        "output-dir": tempfile.mkdtemp(prefix="fedpurel-secagg-"),
        "track.tensorboard": False,
    }
    out = one_round(run_config, args.clients, args.clipping_norm or None)
    what = "private_mean without noise" if args.clipping_norm else "plain FedAvg (weighted by n_k)"
    print(f"{out['contributors']} of {out['clients']} clients aggregated through SecAgg+ in {out['seconds']:.1f} s")
    print(f"weights {out['weights']}; update norms {[round(n, 4) for n in out['update_norms']]}")
    print(
        f"max |SecAgg+ - {what}| = {out['max_error']:.3g} (quantization bound {out['bound']:.3g}; "
        f"largest update value {out['largest_update_value']:.3g})"
    )
    print(f"the server received {out['replies_received']} replies holding {out['arrays_received']} arrays")


if __name__ == "__main__":
    main()
