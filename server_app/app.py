"""FedPuReL ServerApp: zero-shot evaluation, Stage-1 rounds, personalization phase.

The round loop is spelled out here (rather than ``FedAvg.start``) because a
FedPuReL run has two phases and, in the ``interleaved`` schedule, a Stage-2
exchange inside every Stage-1 round.

After every round the server checkpoints phi_g, the round and the results so
far under ``<run dir>/checkpoint/`` (:mod:`fedpurel_app.checkpoint`);
``resume-from = "<run dir>"`` continues such a run at the next round, in the
same folder. Client-side state (phi_k, cached features) stays on the clients.
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedpurel_app import task
from fedpurel_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpurel_app.config import RunConfig, parse_run_config
from fedpurel_app.methods import method_class
from fedpurel_app.metrics import pm_summary
from fedpurel_app.results import RunRecorder, new_run_dir

from .exchange import send_and_receive
from .strategy import FedPuReLStrategy

APP_DIR = Path(__file__).resolve().parent.parent

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config once, set up, then run; a user mistake ends the run with one message."""
    try:
        cfg = parse_run_config(context.run_config)
        setup = _Setup(cfg)
    except ValueError as err:  # ConfigError, ModelLoadError, an impossible Fed-LT split, CheckpointError...
        log(ERROR, "FedPuReL run stopped before training: %s", err)
        return
    _run(grid, cfg, setup)


class _Setup:
    """Everything the server needs before round 1: the model, the test set, the output folder.

    With ``resume-from``: the checkpoint of that run folder (checked against the
    config), whose results the recorder continues in the same folder.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.peft = task.build_model(cfg)
        self.test = task.global_test_set(cfg)
        self.counts = task.class_counts(cfg)
        self.resumed: Checkpoint | None = None
        if cfg.resume_from:
            run_dir = Path(cfg.resume_from).expanduser()
            run_dir = run_dir if run_dir.is_absolute() else (APP_DIR / run_dir).resolve()
            shapes = {k: tuple(v.shape) for k, v in self.peft.global_state().items()}
            self.resumed = load_checkpoint(run_dir, cfg.to_flower(), shapes)
            self.recorder = RunRecorder(run_dir, self.resumed.results["config"])
            self.recorder.data = self.resumed.results
            rounds = self.recorder.data["rounds"]
            self.recorder.started -= rounds[-1]["wall_time"] if rounds else 0.0
            self.recorder.data.setdefault("resumed_after_rounds", []).append(self.resumed.round)
        else:
            label = f"{cfg.method}-{cfg.peft}-seed{cfg.seed}"
            self.recorder = RunRecorder(new_run_dir(cfg.resolved_output_dir(APP_DIR), label), cfg.to_flower())
            method = method_class(cfg.method)
            self.recorder.data["method"] = {"name": method.name, "reports": list(method.reports)}
            self.recorder.data["class_counts"] = [int(c) for c in self.counts]


def _pm(cfg: RunConfig, counts: np.ndarray, records: list[MetricRecord]) -> dict | None:
    """PM metrics pooled over the clients' replies: personalized, global-only and zero-shot."""
    if not records:
        return None
    labels = [np.asarray(r["labels"], dtype=np.int64) for r in records]

    def summary(key: str) -> dict:
        preds = [np.asarray(r[key], dtype=np.int64) for r in records]
        return pm_summary(preds, labels, counts, cfg.many_threshold, cfg.few_threshold)

    result = summary("pm-preds")
    result["global"] = {k: v for k, v in summary("gm-preds").items() if k in ("all", "all_weighted", "few")}
    result["zero_shot"] = summary("zs-preds")
    result["personalized"] = all(int(r["personalized"]) for r in records)
    result["personalized_clients"] = sum(int(r["personalized"]) for r in records)
    return result


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{100 * value:5.1f}"


def _run(grid: Grid, cfg: RunConfig, setup: _Setup) -> None:
    strategy = FedPuReLStrategy(
        {k: tuple(v.shape) for k, v in setup.peft.global_state().items()},
        fraction_train=cfg.fraction_train,
        all_clients_first_round=cfg.all_clients_first_round,
        min_available_nodes=cfg.min_nodes,
        seed=cfg.seed,
        max_examples=int(setup.counts.sum()),
        num_classes=len(setup.counts),
    )
    recorder, counts = setup.recorder, setup.counts
    method = method_class(cfg.method)
    arrays = ArrayRecord(setup.peft.global_state())
    train_config = ConfigRecord({"class-counts": [int(c) for c in counts]} if method.needs_prior else {})

    def exchange(messages):
        return send_and_receive(grid, messages, cfg.round_timeout)

    def evaluate_pm(server_round: int) -> dict | None:
        replies = exchange(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        return _pm(cfg, counts, strategy.evaluate_replies(replies))

    def evaluate_gm() -> dict:
        setup.peft.load_global_state(arrays.to_torch_state_dict())
        return task.evaluate_global(cfg, setup.peft, setup.test, counts)

    def checkpoint(rnd: int, phase: str) -> None:
        save_checkpoint(recorder.run_dir, rnd, phase, arrays.to_torch_state_dict(), cfg.to_flower(), recorder.data)

    done = 0  # the last completed round
    if setup.resumed is not None:
        done, arrays = setup.resumed.round, ArrayRecord(setup.resumed.phi_g)
        log(INFO, "[fedpurel] resuming %s after round %d (%s phase)", recorder.run_dir, done, setup.resumed.phase)
        evaluate_pm(done)  # node ids change across restarts: learn again which node holds which partition
    else:
        zero_shot_pm = evaluate_pm(0)
        recorder.zero_shot(
            task.evaluate_zero_shot(cfg, setup.test, counts), zero_shot_pm and zero_shot_pm["zero_shot"]
        )
    zs = recorder.data["zero_shot"]["gm"]
    log(INFO, "[fedpurel] zero-shot   GM all %s few %s", _fmt(zs["all"]), _fmt(zs["few"]))
    if not method.trains_global:  # zero-shot: the frozen CLIP is the result
        recorder.add_round(0, "final", gm=zs, pm=recorder.data["zero_shot"].get("pm"))
        _finish(recorder, arrays)
        return

    post = cfg.personalization == "post" and method.personal_phase
    total = cfg.num_rounds + (cfg.personal_rounds if post else 0)
    for rnd in range(done + 1, cfg.num_rounds + 1):
        replies = exchange(strategy.configure_train(rnd, arrays, train_config, grid))
        arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if cfg.personalization == "interleaved":
            exchange(strategy.configure_personalize(rnd, arrays, grid, strategy.last_sampled))
        due = rnd % cfg.eval_every == 0 or rnd == cfg.num_rounds
        gm = evaluate_gm() if due else None
        pm = evaluate_pm(rnd) if due and cfg.personalization == "interleaved" else None
        train = dict(train_metrics) if train_metrics is not None else None
        if train is not None:
            train["clients"] = len(strategy.last_sampled)
        recorder.add_round(rnd, "global", gm=gm, pm=pm, train=train)
        checkpoint(rnd, "global")
        log(
            INFO,
            "[fedpurel] round %d/%d global    GM all %s few %s | conflict %s | %.1fs",
            rnd, total, _fmt(gm and gm["all"]), _fmt(gm and gm["few"]),
            _fmt(train and train.get("conflict-rate")), recorder.elapsed(),
        )

    if post:
        for step in range(max(1, done - cfg.num_rounds + 1), cfg.personal_rounds + 1):
            rnd = cfg.num_rounds + step
            due = step % cfg.eval_every == 0 or step == cfg.personal_rounds
            # One message per client: personalize, then evaluate in the same ClientApp call.
            replies = exchange(strategy.configure_personalize(rnd, arrays, grid, evaluate=due))
            pm = _pm(cfg, counts, strategy.evaluate_replies(replies)) if due else None
            recorder.add_round(rnd, "personal", pm=pm)
            checkpoint(rnd, "personal")
            log(INFO, "[fedpurel] round %d/%d personal  PM all %s | %.1fs",
                rnd, total, _fmt(pm and pm["all"]), recorder.elapsed())
    if not any("pm" in r for r in recorder.data["rounds"]):
        recorder.add_round(cfg.num_rounds, "final", pm=evaluate_pm(cfg.num_rounds))
    _finish(recorder, arrays)


def _finish(recorder: RunRecorder, arrays: ArrayRecord) -> None:
    recorder.finish(arrays.to_torch_state_dict())
    for line in recorder.table().splitlines():
        log(INFO, "[fedpurel] %s", line)
    log(INFO, "[fedpurel] results: %s", recorder.run_dir / "results.json")
