"""The server's side of a run, apart from moving messages: model, plan, evaluation, results.

The ServerApp makes one :class:`ServerRun`, then executes ``run.plan`` step
by step: it sends the step's messages, hands the replies' contents to
:meth:`ServerRun.record` and calls :meth:`ServerRun.checkpoint`. A run
started with ``resume-from`` continues the killed run's folder after its
last completed step (:attr:`ServerRun.done`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig, fingerprint
from .data.client import class_counts, global_test
from .inputs import FeatureSet, clip_of, feature_cache_dir, feature_set
from .methods.base import build_method
from .metrics import gm_summary, pm_summary
from .peft.base import build_peft, input_kind
from .plan import Step
from .privacy import PrivacyAccountant, noise_for_epsilon
from .protocol import Evaluation
from .results import RunRecorder, new_run_dir
from .tkl import confidence_gap
from .tracking import Tracking
from .training import autocast, resolve_precision


def pm_metrics(cfg: RunConfig, counts: np.ndarray, evaluations: Sequence[Evaluation]) -> dict[str, Any] | None:
    """PM metrics pooled over the clients' evaluations: personalized, global-only and zero-shot."""
    if not evaluations:
        return None
    many, few = cfg.data.many_threshold, cfg.data.few_threshold

    def summary(field: str) -> dict[str, Any]:
        return pm_summary([(getattr(e, field), e.class_total) for e in evaluations], counts, many, few)

    result = summary("pm_correct")
    result["global"] = {k: v for k, v in summary("gm_correct").items() if k in ("all", "all_weighted", "few")}
    result["zero_shot"] = summary("zs_correct")
    result["personalized"] = all(e.personalized for e in evaluations)
    result["personalized_clients"] = sum(int(e.personalized) for e in evaluations)
    return result


class ServerRun:
    """Everything the server holds for one run: the model, the test set, the plan and the results."""

    def __init__(self, cfg: RunConfig, app_dir: Path) -> None:
        self.cfg = cfg
        clip = clip_of(cfg.model, cfg.data)
        data = global_test(cfg.data)
        self.precision = resolve_precision(cfg.model.precision, clip.device)
        self.peft = build_peft(cfg, clip, data.classnames, data.template)
        self.test: FeatureSet = feature_set(
            clip,
            input_kind(cfg.peft.name),
            data.test,
            data.test_identity,
            data.classnames,
            data.template,
            feature_cache_dir(cfg.model),
        )
        self.counts = class_counts(cfg.data, cfg.seed)
        self.method = build_method(cfg, self.counts)
        self.plan = self.method.plan()
        self.phi_g = self.peft.global_state()
        self.config_key = fingerprint(cfg, "checkpoint")
        #: The index of the last completed step (-1: none yet).
        self.done = -1
        self.accountant: PrivacyAccountant | None = None
        if cfg.resume_from:
            run_dir = Path(cfg.resume_from).expanduser()
            run_dir = run_dir if run_dir.is_absolute() else (app_dir / run_dir).resolve()
            shapes = {k: tuple(v.shape) for k, v in self.phi_g.items()}
            resumed = load_checkpoint(run_dir, self.config_key, shapes)
            self.done, self.phi_g = resumed.step, resumed.phi_g
            self.recorder = RunRecorder(run_dir, resumed.results["config"])
            self.recorder.data = resumed.results
            rounds = self.recorder.data["rounds"]
            self.recorder.started -= rounds[-1]["wall_time"] if rounds else 0.0
            self.recorder.data.setdefault("resumed_after_rounds", []).append(resumed.round)
            self.resumed_phase = resumed.phase
        else:
            label = f"{cfg.method.name}-{cfg.peft.name}-seed{cfg.seed}"
            self.recorder = RunRecorder(new_run_dir(cfg.resolved_output_dir(app_dir), label), cfg.to_flower())
            self.recorder.data["method"] = {"name": cfg.method.name, "reports": list(self.method.reports)}
            self.recorder.data["class_counts"] = [int(c) for c in self.counts]
            # Names the run for its nodes; kept through resume (it is in the checkpointed results).
            self.recorder.data["run"] = f"{self.run_dir.name}-{secrets.token_hex(4)}"
            self.resumed_phase = ""
        # Where this server process computes and under which autocast (bench/gpu_check.py reads it).
        self.recorder.data["device"] = {"device": str(clip.device), "precision": self.precision}
        completed_round = self.plan.steps[self.done].round if self.done >= 0 else -1
        self.tracking = Tracking(
            cfg.track,
            self.run_dir,
            cfg.resolved_output_dir(app_dir),
            [int(c) for c in self.counts],
            self.recorder.data["config"],
            completed_round + 1,
            self.recorder.data.get("mlflow_run"),
        )
        if self.tracking.mlflow_run:
            self.recorder.data["mlflow_run"] = self.tracking.mlflow_run

    @property
    def run_dir(self) -> Path:
        return self.recorder.run_dir

    @property
    def tag(self) -> str:
        """The run's name for its nodes (their state folders of this run): the run folder's name
        and a random suffix, drawn once per run and kept through resume."""
        return self.recorder.data.get("run") or self.run_dir.name

    # --- differential privacy ----------------------------------------------------------------

    def start_privacy(self, population: int) -> float:
        """The noise multiplier of a DP run with ``population`` clients (computed from
        ``dp.target-epsilon`` for the plan's Stage-1 rounds when that is set); kept through resume."""
        dp, train = self.cfg.dp, self.cfg.train
        record = self.recorder.data.setdefault("privacy", {})
        if "noise_multiplier" not in record:
            planned = [
                population
                if (step.round == 1 and train.all_clients_first_round)
                else min(population, max(1, round(population * train.fraction)))
                for step in self.plan.steps
                if step.train
            ]
            z = dp.noise_multiplier
            if dp.target_epsilon > 0:
                z = noise_for_epsilon(dp.target_epsilon, dp.delta, population, planned)
            record.update(
                noise_multiplier=z,
                clipping_norm=dp.clipping_norm,
                delta=dp.delta,
                population=population,
                releases=[],
                epsilon=0.0,
            )
        self.accountant = PrivacyAccountant(record["noise_multiplier"], record["population"], record["delta"])
        for sampled in record["releases"]:
            self.accountant.add_round(sampled)
        return float(record["noise_multiplier"])

    def privacy_release(self, sampled: int) -> dict[str, float]:
        """Account one Stage-1 release of ``sampled`` clients; the round's ``privacy.*`` report."""
        self.accountant.add_round(sampled)
        report = self.accountant.report(self.cfg.dp.clipping_norm)
        record = self.recorder.data["privacy"]
        record["releases"].append(sampled)
        record["epsilon"] = report["epsilon"]
        return report

    def class_counts_for_messages(self) -> tuple[int, ...] | None:
        """The global class counts, for a method that needs the prior in its messages."""
        return tuple(int(c) for c in self.counts) if self.method.needs_prior else None

    # --- evaluation ------------------------------------------------------------------------

    def evaluate_gm(self) -> dict[str, Any]:
        """GM metrics of phi_g on the balanced test set, plus how its confidence differs from zero-shot's
        there (:func:`fedpurel_app.tkl.confidence_gap`: TKL and KL from z to l_G, entropies)."""
        cfg, test = self.cfg, self.test
        self.peft.load_global_state(self.phi_g)
        with torch.no_grad(), autocast(test.features.device, self.precision):
            logits = self.peft.global_logits(test.features).float()
        solve = {
            "tau_min": cfg.tkl.tau_min,
            "tau_max": cfg.tkl.tau_max,
            "tol": cfg.tkl.tol,
            "max_iter": cfg.tkl.max_iter,
        }
        gap = confidence_gap(logits, test.zero_shot_logits, **solve)
        preds = logits.argmax(dim=-1).cpu().numpy()
        summary = gm_summary(
            preds, test.labels.cpu().numpy(), self.counts, cfg.data.many_threshold, cfg.data.few_threshold
        )
        summary.update(gap)
        return summary

    def evaluate_zero_shot(self) -> dict[str, Any]:
        """GM metrics of the frozen zero-shot CLIP on the balanced test set."""
        preds = self.test.zero_shot_logits.argmax(dim=-1).cpu().numpy()
        return gm_summary(
            preds,
            self.test.labels.cpu().numpy(),
            self.counts,
            self.cfg.data.many_threshold,
            self.cfg.data.few_threshold,
        )

    def pm(self, evaluations: Sequence[Evaluation]) -> dict[str, Any] | None:
        return pm_metrics(self.cfg, self.counts, evaluations)

    # --- results ---------------------------------------------------------------------------

    def record(
        self,
        step: Step,
        gm: dict | None = None,
        pm: dict | None = None,
        train: dict | None = None,
        extras: dict[str, float] | None = None,
        privacy: dict[str, float] | None = None,
    ) -> None:
        """Record one executed step in results.json and the trackers; ``extras``: what the step
        cost (clients that replied, bytes on the wire, seconds), for the trackers; ``privacy``: the
        privacy spent after a DP release."""
        if step.phase == "zero-shot":
            gm = self.evaluate_zero_shot()
            pm = pm and pm["zero_shot"]
            self.recorder.zero_shot(gm, pm)
        else:
            self.recorder.add_round(step.round, step.phase, gm=gm, pm=pm, train=train, privacy=privacy)
        elapsed = {"elapsed": self.recorder.elapsed(), **(extras or {})}
        last_gm = [s for s in self.plan.steps if s.gm][-1]
        if privacy:
            elapsed.update({f"privacy-{k}": v for k, v in privacy.items()})
        self.tracking.step(step.round, gm, pm, train, elapsed, last=step is last_gm)

    def checkpoint(self, index: int, step: Step) -> None:
        """The state after step ``index``: what a resumed run starts from."""
        save_checkpoint(self.run_dir, index, step.round, step.phase, self.phi_g, self.config_key, self.recorder.data)
        self.done = index

    def finish(self) -> None:
        """A plan without any round reports its zero-shot model as final; then results.json and phi_g."""
        if not self.recorder.data["rounds"]:
            zero_shot = self.recorder.data["zero_shot"]
            self.recorder.add_round(0, "final", gm=zero_shot["gm"], pm=zero_shot.get("pm"))
        final = self.recorder.finish(self.phi_g)
        self.tracking.finish(final)


__all__ = ["ServerRun", "pm_metrics"]
