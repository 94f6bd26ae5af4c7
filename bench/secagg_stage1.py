"""Stage 1 through Flower's SecAgg+ (a prototype): one Stage-1 round of our ClientApp, aggregated by
Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod``, against plain FedAvg of the same updates.

Not an option of the app yet (docs/RELIABILITY.md "Secure aggregation (SecAgg+)" says what is
missing). It shows the route: Flower 1.41's SecAgg+ exists only for the legacy API, so a Stage-1
round is run by the workflow with two adapters, and everything else stays as it is:

- server: :func:`secagg_round` gives the workflow the ``LegacyContext`` it insists on (phi_g in
  ``state["parameters"]``, the round in ``state["config"]``) and a legacy :class:`Stage1Strategy`
  whose ``configure_fit`` hands our sampled nodes (``GridClientProxy``) the round's
  :class:`~fedpurel_app.protocol.Instruction` and whose ``aggregate_fit`` takes the workflow's
  unmasked aggregate (the only array it ever sees);
- client: :func:`secagg_client_app` puts ``secaggplus_mod`` in front of a ``train`` handler that
  turns the legacy ``fitins.*`` content into our Stage-1 message, calls our ClientApp (its own
  mods included: a DP run's clipping by ``fixedclipping_mod``), and replies the *update*
  ``phi_g^k - phi_g`` as legacy ``fitres.*`` content, weighted by ``n_k``, or uniformly (weight 1)
  in a DP run. SecAgg+ quantizes values in ``[-clipping_range, clipping_range]``: an update fits
  that range far better than phi_g's values do (with DP the range is the clipping norm, which
  bounds every coordinate).

``python bench/secagg_stage1.py [--clients 5] [--clipping-norm 0.05]`` prints the largest difference
to plain FedAvg (or, with a clipping norm, to :func:`fedpurel_app.privacy.private_mean` without
noise), the bound SecAgg+'s quantization gives, and what the server received.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402

from fedpurel_app import protocol  # noqa: E402
from fedpurel_app.protocol import Instruction  # noqa: E402

KEYS = "secagg-keys"  # the names of phi_g's tensors, in the order of the legacy Parameters
QUANTIZATION_RANGE = 1 << 22  # SecAggPlusWorkflow's defaults
MODULUS_RANGE = 1 << 32

Tensors = dict[str, torch.Tensor]


def secagg_client_app(inner: ClientApp, spy: Callable[[int, Tensors, int], None] | None = None) -> ClientApp:
    """A ClientApp whose ``train`` runs SecAgg+ around ``inner``'s Stage-1 handler.

    ``spy(node, update, weight)`` sees each client's unmasked update before it is masked (a test's
    view from inside the client; nothing of it is sent)."""
    app = ClientApp()

    @app.train(mods=[secaggplus_mod])
    def train(msg: Message, context: Context) -> Message:
        config = dict(msg.content.config_records["fitins.config"])
        names = list(config.pop(KEYS))
        arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(msg.content["fitins.parameters"], True))
        phi_g = {k: torch.from_numpy(np.array(v)) for k, v in zip(names, arrays, strict=True)}
        ours = Message(
            RecordDict({protocol.ARRAYS: ArrayRecord(phi_g), protocol.CONFIG: ConfigRecord(config)}),
            dst_node_id=msg.metadata.dst_node_id,
            message_type=protocol.TRAIN,
        )
        out = inner(ours, context)
        if out.has_error():
            return Message(out.error, reply_to=msg)
        mine = out.content[protocol.ARRAYS].to_torch_state_dict()
        metrics = dict(out.content[protocol.METRICS])
        weight = 1 if protocol.CLIPPING_NORM in config else int(metrics["num-examples"])
        update = {k: mine[k] - phi_g[k] for k in names}
        if spy is not None:
            spy(msg.metadata.dst_node_id, update, weight)
        parameters = ndarrays_to_parameters([update[k].numpy() for k in names])
        fitres = FitRes(Status(Code.OK, ""), parameters, weight, metrics)
        return Message(compat.fitres_to_recorddict(fitres, True), reply_to=msg)

    return app


class Stage1Strategy(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: our nodes and instruction in, its aggregate out."""

    def __init__(self, grid, nodes: list[int], instruction: Instruction, names: list[str]) -> None:
        self.grid, self.nodes, self.instruction, self.names = grid, nodes, instruction, names
        self.contributors = 0

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        config = {**self.instruction.to_config(), KEYS: self.names}
        return [(GridClientProxy(node, self.grid, 1), FitIns(parameters, config)) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # The workflow has put its unmasked aggregate in every result: no individual update.
        self.contributors = len(results)
        return (results[0][1].parameters, {}) if results else (None, {})

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secagg_round(
    grid,
    nodes: list[int],
    phi_g: Tensors,
    instruction: Instruction,
    max_weight: float,
    timeout: float | None = None,
) -> tuple[Tensors, int]:
    """One Stage-1 round through SecAgg+: (phi_g + the weighted mean update, the number of
    contributors). With ``instruction.clipping_norm`` the clients weigh 1 and clip, and the range is
    the clipping norm. Raises RuntimeError when the workflow halts (too few clients left)."""
    names = list(phi_g)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    sent = ndarrays_to_parameters([phi_g[k].numpy() for k in names])  # what configure_fit sends
    context.state[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(sent, True)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: instruction.server_round})
    strategy = Stage1Strategy(grid, nodes, instruction, names)
    legacy = LegacyContext(context, strategy=strategy, client_manager=SimpleClientManager())
    workflow = SecAggPlusWorkflow(
        num_shares=len(nodes),
        reconstruction_threshold=0.6,
        max_weight=1.0 if instruction.clipping_norm else max_weight,
        clipping_range=float(instruction.clipping_norm or 8.0),
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow(grid, legacy)
    if not strategy.contributors:
        raise RuntimeError(f"round {instruction.server_round}: secure aggregation halted (too few clients)")
    params = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state[MAIN_PARAMS_RECORD], True))
    mean = {k: torch.from_numpy(np.array(v)) for k, v in zip(names, params, strict=True)}
    return {k: (phi_g[k].double() + mean[k].double()).to(phi_g[k].dtype) for k in names}, strategy.contributors


class LocalGrid:
    """``send_and_receive`` to in-process nodes (each message copied, as the wire does); keeps every
    reply the server receives."""

    def __init__(self, app: ClientApp, contexts: dict[int, Context]) -> None:
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


def arrays_received(grid: LocalGrid) -> int:
    """Entries with data in the ArrayRecords of every reply the server received."""
    return sum(len(r) for msg in grid.received if not msg.has_error() for r in msg.content.array_records.values())


def quantization_bound(clipping_range: float, weights: list[int], max_weight: float) -> float:
    """The largest error of SecAgg+'s weighted mean per value: every client's quantization step of
    its weighted value (weight / max_weight), summed, over the sum of the weights' ratios."""
    step = 2 * clipping_range / (QUANTIZATION_RANGE - 1)
    ratios = [round(w / max_weight * QUANTIZATION_RANGE) / QUANTIZATION_RANGE for w in weights]
    return len(weights) * step / sum(ratios)


def one_round(run_config: dict, clients: int, clipping_norm: float | None) -> dict:
    """Set up the run, then round 1 (every client) through SecAgg+; the comparison with plain FedAvg."""
    from flwr.common.config import unflatten_dict
    from flwr.supercore.task_identity import TaskIdentity

    from client_app import app as client
    from fedpurel_app.config import parse_run_config
    from fedpurel_app.privacy import private_mean, update_norm
    from fedpurel_app.server import ServerRun

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # messages built outside Flower
        setattr(TaskIdentity, name, value)
    cfg = parse_run_config(unflatten_dict(dict(run_config)))
    run = ServerRun(cfg, ROOT)
    seen: dict[int, tuple[Tensors, int]] = {}
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
    grid = LocalGrid(secagg_client_app(client.app, lambda n, u, w: seen.__setitem__(n, (u, w))), contexts)
    instruction = Instruction(1, run.tag, run.class_counts_for_messages(), False, clipping_norm)
    max_weight = float(run.counts.sum())
    started = time.perf_counter()
    released, contributors = secagg_round(grid, list(contexts), run.phi_g, instruction, max_weight)
    seconds = time.perf_counter() - started
    updates = [seen[n] for n in sorted(seen)]
    if clipping_norm:
        expected = private_mean(
            run.phi_g, [{k: run.phi_g[k] + u[k] for k in u} for u, _ in updates], clients, 0.0, clipping_norm
        )
        bound = quantization_bound(clipping_norm, [1] * clients, 1.0)
    else:
        total = sum(w for _, w in updates)
        expected = {k: run.phi_g[k].double() + sum(u[k].double() * w for u, w in updates) / total for k in run.phi_g}
        bound = quantization_bound(8.0, [w for _, w in updates], max_weight)
    error = max(float((released[k].double() - expected[k].double()).abs().max()) for k in run.phi_g)
    return {
        "clients": clients,
        "contributors": contributors,
        "weights": [w for _, w in updates],
        "update_norms": [update_norm({k: run.phi_g[k] + u[k] for k in u}, run.phi_g) for u, _ in updates],
        "max_error": error,
        "bound": bound,
        "largest_update_value": max(float(u[k].abs().max()) for u, _ in updates for k in u),
        "arrays_received": arrays_received(grid),
        "replies_received": len(grid.received),
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
