"""FedPuReL ServerApp: execute the method's round plan, step by step.

The method declares its plan (:mod:`fedpurel_app.plan`): the zero-shot
evaluation, Stage-1 rounds, personalization rounds and evaluations. For each
step this app sends the step's messages (:mod:`fedpurel_app.protocol`),
checks every reply, hands the results to the library
(:class:`fedpurel_app.server.ServerRun`) and checkpoints (a Stage-1 round with
``secagg.enabled`` is aggregated by Flower's SecAgg+: :mod:`server_app.secagg`); ``resume-from``
continues a killed run after its last completed step. The plan is logged at
the start.

A user's mistake (:class:`fedpurel_app.errors.UserError`: config, model,
data, checkpoint, or every client's own) ends the run with one message and
no traceback, and Flower records the run as failed.
"""

from __future__ import annotations

import logging
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.common import log
from flwr.common.config import unflatten_dict
from flwr.serverapp import Grid, ServerApp

from fedpurel_app.config import parse_run_config
from fedpurel_app.errors import UserError
from fedpurel_app.plan import Step
from fedpurel_app.protocol import EvaluateReply, Instruction, PersonalizeReply
from fedpurel_app.server import ServerRun

from .exchange import send_and_receive
from .secagg import check_sample_size, secure_round
from .strategy import FedPuReLStrategy, metrics_of

APP_DIR = Path(__file__).resolve().parent.parent

app = ServerApp()


class _UserErrorsWithoutTraceback(logging.Filter):
    """Flower logs the exception that ends a ServerApp with its traceback. A user error has
    been reported in one line already: its record keeps its message, not the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.msg, record.args = "%s (see the FedPuReL message above)", (record.getMessage(),)
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("flwr").addFilter(_UserErrorsWithoutTraceback())


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config once, set up, run the plan; a user mistake ends the run with one message."""
    try:
        cfg = parse_run_config(unflatten_dict(context.run_config))
        run = ServerRun(cfg, APP_DIR)
        _execute(grid, run)
    except UserError as err:
        log(ERROR, "FedPuReL run stopped: %s", err)
        raise


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{100 * value:5.1f}"


def _execute(grid: Grid, run: ServerRun) -> None:
    cfg, plan = run.cfg, run.plan
    strategy = FedPuReLStrategy(
        {k: tuple(v.shape) for k, v in run.phi_g.items()},
        fraction_train=cfg.train.fraction,
        all_clients_first_round=cfg.train.all_clients_first_round,
        min_available_nodes=cfg.train.min_nodes,
        seed=cfg.seed,
        max_examples=int(run.counts.sum()),
        num_classes=len(run.counts),
        dp=cfg.dp if cfg.dp.enabled else None,
    )
    num_classes = len(run.counts)

    cost = {"bytes-down": 0, "bytes-up": 0, "replies": 0}  # of the current step, for the trackers

    def exchange(messages: list[Message]) -> list[Message]:
        messages = list(messages)
        replies = send_and_receive(grid, messages, cfg.round_timeout)
        cost["bytes-down"] += sum(_content_bytes(m) for m in messages)
        cost["bytes-up"] += sum(_content_bytes(m) for m in replies)
        cost["replies"] += sum(not m.has_error() for m in replies)
        return replies

    def instruction(rnd: int, evaluate: bool = False, train: bool = False) -> Instruction:
        clipping = cfg.dp.clipping_norm if train and cfg.dp.enabled else None
        return Instruction(rnd, run.tag, run.class_counts_for_messages(), evaluate, clipping)

    def restored(what: str, replies: list) -> None:
        count = sum(int(reply.restored) for _, reply in replies)
        if count:
            log(
                INFO,
                "[fedpurel] %s: %d of %d clients restored their private state from their state folder",
                what,
                count,
                len(replies),
            )

    def evaluate_pm(rnd: int) -> dict | None:
        what = f"round {rnd} evaluation"
        arrays = ArrayRecord(run.phi_g)
        messages = strategy.configure_evaluate(rnd, arrays, instruction(rnd), grid)
        replies = strategy.read_replies(
            what,
            exchange(list(messages)),
            lambda m: EvaluateReply.read(metrics_of(m), num_classes),
            [m.metadata.dst_node_id for m in messages],
        )
        restored(what, replies)
        return run.pm([reply.evaluation for reply in _by_partition(replies)])

    def personalize(step: Step, nodes: list[int] | None) -> dict | None:
        what = f"round {step.round} personalization"
        evaluate = step.pm and step.personalize == "all"
        messages = strategy.configure_personalize(
            ArrayRecord(run.phi_g), instruction(step.round, evaluate), grid, nodes
        )
        replies = strategy.read_replies(
            what,
            exchange(messages),
            lambda m: PersonalizeReply.read(metrics_of(m), num_classes, evaluate),
            [m.metadata.dst_node_id for m in messages],
        )
        restored(what, replies)
        return run.pm([reply.evaluation for reply in _by_partition(replies)]) if evaluate else None

    log(INFO, "[fedpurel] run folder %s", run.run_dir)
    log(INFO, "[fedpurel] plan of %s (%d steps):", cfg.method.name, len(plan.steps))
    for line in plan.describe().splitlines():
        log(INFO, "[fedpurel]   %s", line)
    if run.done >= 0:
        log(INFO, "[fedpurel] resuming after step %d (%s phase)", run.done, run.resumed_phase)
        # Node ids change across restarts: learn again which node holds which partition.
        query = strategy.configure_query(instruction(0), grid)
        strategy.identities(exchange(query))

    if cfg.secagg.enabled:  # before any training: SecAgg+ needs 2 clients in the plan's smallest round
        connected = len(strategy.nodes(grid))
        check_sample_size(min(strategy.sample_size(s.round, connected) for s in plan.steps if s.train))
    total = plan.total_rounds
    for index, step in enumerate(plan.steps):
        if index <= run.done:
            continue
        gm = pm = train = privacy = None
        started = time.perf_counter()
        cost.update({"bytes-down": 0, "bytes-up": 0, "replies": 0})
        if step.phase == "zero-shot":
            pm = evaluate_pm(0) if step.pm else None
        if step.train:
            train_instruction = instruction(step.round, train=True)
            if cfg.secagg.enabled:  # SecAgg+ sends its own messages: only the sampling is ours
                sampled, messages = strategy.sample_train(step.round, grid), []
            else:
                messages = list(strategy.configure_train(step.round, ArrayRecord(run.phi_g), train_instruction, grid))
                sampled = strategy.last_sampled
            if cfg.dp.enabled and run.accountant is None:
                strategy.noise_multiplier = run.start_privacy(len(strategy.nodes(grid)))
                log(
                    INFO,
                    "[fedpurel] differential privacy: noise multiplier %.4g, clipping norm %g, delta %g",
                    strategy.noise_multiplier,
                    cfg.dp.clipping_norm,
                    cfg.dp.delta,
                )
            if cfg.secagg.enabled:
                secure = secure_round(
                    grid,
                    exchange,
                    sampled,
                    run.phi_g,
                    train_instruction,
                    cfg.secagg,
                    int(run.counts.sum()),
                    cfg.round_timeout,
                    strategy.noise_multiplier,
                )
                run.phi_g, train = secure.phi_g, secure.train_metrics()
            else:
                arrays, metrics = strategy.aggregate_train(step.round, exchange(messages))
                run.phi_g = arrays.to_torch_state_dict()
                train = dict(metrics) if metrics is not None else {}
            if cfg.dp.enabled:
                privacy = run.privacy_release(len(strategy.last_sampled))
            train["clients"] = len(strategy.last_sampled)
        if step.personalize:
            nodes = strategy.last_sampled if step.personalize == "sampled" else None
            pm = personalize(step, nodes)
        if step.gm and step.phase != "zero-shot":
            gm = run.evaluate_gm()
        if step.pm and step.phase != "zero-shot" and step.personalize != "all":
            pm = evaluate_pm(step.round)
        run.record(
            step, gm=gm, pm=pm, train=train, extras={**cost, "seconds": time.perf_counter() - started}, privacy=privacy
        )
        run.checkpoint(index, step)
        _log_step(run, step, total, gm, pm, train, privacy)
    run.finish()
    for line in run.recorder.table().splitlines():
        log(INFO, "[fedpurel] %s", line)
    log(INFO, "[fedpurel] results: %s", run.run_dir / "results.json")


def _content_bytes(msg: Message) -> int:
    """Bytes of a message's records (Flower's own count: the arrays' data, keys and metrics)."""
    if msg.has_error():
        return 0
    return sum(_record_bytes(record) for record in msg.content.values())


def _record_bytes(record) -> int:
    """Flower's ``count_bytes``; for a record it cannot count (it raises on an empty str or bytes
    value and on an empty list, which SecAgg+'s records hold), the length of its serialized form."""
    try:
        return record.count_bytes()
    except (ValueError, IndexError):
        return len(record.deflate())


def _by_partition(replies: list) -> list:
    """Replies in partition order: per-client lists (and sums over clients) do not depend on
    the order in which replies arrived."""
    return [reply for _, reply in sorted(replies, key=lambda pair: pair[1].partition_id)]


def _log_step(
    run: ServerRun,
    step: Step,
    total: int,
    gm: dict | None,
    pm: dict | None,
    train: dict | None,
    privacy: dict | None = None,
) -> None:
    elapsed = run.recorder.elapsed()
    if step.phase == "zero-shot":
        zs = run.recorder.data["zero_shot"]["gm"]
        log(INFO, "[fedpurel] zero-shot   GM all %s few %s", _fmt(zs["all"]), _fmt(zs["few"]))
    elif step.phase == "global":
        spent = (
            ""
            if privacy is None
            else (
                f" | privacy epsilon {privacy['epsilon']:.3g} delta {privacy['delta']:g} "
                f"(noise multiplier {privacy['noise_multiplier']:.3g}, clipping norm {privacy['clipping_norm']:g})"
            )
        )
        if train and "secagg-contributors" in train:
            spent += (
                f" | SecAgg+ {train['secagg-contributors']}/{train['clients']} clients, "
                f"{train['secagg-arrays-received']} arrays at the server"
            )
        log(
            INFO,
            "[fedpurel] round %d/%d global    GM all %s few %s | conflict %s | %.1fs%s",
            step.round,
            total,
            _fmt(gm and gm["all"]),
            _fmt(gm and gm["few"]),
            _fmt(train and train.get("conflict-rate")),
            elapsed,
            spent,
        )
    elif step.phase == "personal":
        log(
            INFO,
            "[fedpurel] round %d/%d personal  PM all %s | %.1fs",
            step.round,
            total,
            _fmt(pm and pm["all"]),
            elapsed,
        )
    else:
        log(INFO, "[fedpurel] final       PM all %s | %.1fs", _fmt(pm and pm["all"]), elapsed)
    if pm is None and step.pm:
        log(WARNING, "[fedpurel] round %d: no valid PM evaluation reply", step.round)
