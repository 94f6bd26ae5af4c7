"""Experiment tracking: TensorBoard event files in every run folder, and MLflow as an option.

The server hands every recorded step to :class:`Tracking`, which writes it
as it ends (``track.*`` keys):

- **TensorBoard** (``track.tensorboard``, on by default): ``<run dir>/tensorboard/``,
  one step per round (0 = zero-shot): ``gm/*`` and ``pm/*`` (all, many,
  medium, few, balancedness, ...), ``train/*`` (the losses, the conflict rate
  and mean cosine of purification, the sampled clients), ``round/*`` (clients
  that replied, bytes sent and received, the step's wall time and the run's;
  once per round: a plan's final PM evaluation under the last round adds only
  its ``pm/*`` to that round), the per-class accuracy as a histogram
  (``gm/per_class``, ``pm/per_class``) and, every ``track.image-every`` rounds
  and at the last, an image of per-class accuracy against the class's training
  count (``classes/accuracy_vs_count``). At the end, the run config as
  hyper-parameters with the final metrics (``final/*``, at the last step;
  TensorBoard's HParams view). A resumed run continues its curves: the writer
  purges what the killed run wrote after its last checkpointed step.
- **MLflow** (``track.mlflow``): the same scalars and the config as params in a
  local store (``track.mlflow-uri``, default the SQLite file ``<output-dir>/mlflow.db``;
  no server, no network), one MLflow run per fedpurel run, resumed with it.

Pure library code: no Flower imports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

GROUPS = ("all", "many", "medium", "few", "balancedness", "per_class_std")
TRAIN_KEYS = ("task-loss", "align-loss", "conflict-rate", "mean-cosine", "clients")
TB_FOLDER = "tensorboard"


def step_scalars(
    gm: Mapping | None, pm: Mapping | None, train: Mapping | None, extras: Mapping[str, float] | None = None
) -> dict[str, float]:
    """The scalars of one step, by tag (``gm/all``, ``pm/few``, ``train/conflict-rate``, ``round/bytes-up``...)."""
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)

    for prefix, summary in (("gm", gm), ("pm", pm)):
        for key in (*GROUPS, "all_weighted", "tkl_to_zero_shot"):
            put(f"{prefix}/{key}", (summary or {}).get(key))
    if pm:
        put("pm/global_all", (pm.get("global") or {}).get("all"))
        put("pm/zero_shot_all", (pm.get("zero_shot") or {}).get("all"))
    for key in TRAIN_KEYS:
        put(f"train/{key}", (train or {}).get(key))
    for key, value in (extras or {}).items():
        put(f"round/{key}", value)
    return out


def accuracy_vs_count_image(per_class: Sequence[float | None], counts: Sequence[int], title: str) -> np.ndarray:
    """An RGB image [H, W, 3] (uint8) of per-class accuracy against the class's training count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acc = np.array([np.nan if a is None else a for a in per_class], dtype=float)
    figure = Figure(figsize=(5, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(np.maximum(np.asarray(counts, float), 0.8), 100 * acc, s=14)
    axes.set_xscale("log")
    axes.set_ylim(-2, 102)
    axes.set_xlabel("training images of the class (log)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def hparam_value(value: Any) -> Any:
    """A config value as TensorBoard's HParams takes it (numbers, bools, strings)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardWriter:
    """Event files of one run; ``first_step``: the first step this process writes (purges later ones)."""

    def __init__(self, folder: Path, first_step: int, counts: Sequence[int], image_every: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.counts = list(counts)
        self.image_every = image_every
        self.writer = SummaryWriter(str(folder), purge_step=first_step if first_step > 0 else None)

    def step(self, step: int, scalars: Mapping[str, float], gm: Mapping | None, pm: Mapping | None, last: bool) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for prefix, summary in (("gm", gm), ("pm", pm)):
            per_class = [a for a in (summary or {}).get("per_class") or [] if a is not None]
            if per_class:
                self.writer.add_histogram(f"{prefix}/per_class", np.asarray(per_class), step)
        if gm and gm.get("per_class") and (step % self.image_every == 0 or last):
            image = accuracy_vs_count_image(gm["per_class"], self.counts, f"GM per class, round {step}")
            self.writer.add_image("classes/accuracy_vs_count", image, step, dataformats="HWC")
        self.writer.flush()

    def finish(self, config: Mapping[str, Any], final: Mapping[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        hp = {key: hparam_value(value) for key, value in config.items()}
        for summary in hparams(hp, dict(final)):
            self.writer.file_writer.add_summary(summary)
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.close()


class MlflowWriter:
    """The same scalars and the config in a local MLflow store (one MLflow run per fedpurel run)."""

    def __init__(self, uri: str, run_name: str, run_id: str | None, config: Mapping[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(
                "track.mlflow = true needs the package mlflow-skinny: install it (pip install 'fedpurel[track]') "
                "or set track.mlflow = false"
            ) from None
        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name("fedpurel")
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("fedpurel")
            run = self.client.create_run(experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(key, str(value)[:500]) for key, value in config.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=params[start : start + 100])
        else:
            self.run_id = run_id

    def step(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag.replace("/", "."), value, now, step) for tag, value in scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, final: Mapping[str, float], step: int) -> None:
        self.step(step, final)
        self.client.set_terminated(self.run_id)


class Tracking:
    """Where a run's steps go besides results.json (see the module doc)."""

    def __init__(
        self,
        track: Any,
        run_dir: Path,
        output_dir: Path,
        counts: Sequence[int],
        config: Mapping[str, Any],
        first_step: int,
        mlflow_run: str | None,
    ) -> None:
        self.tensorboard = (
            TensorBoardWriter(run_dir / TB_FOLDER, first_step, counts, track.image_every) if track.tensorboard else None
        )
        self.mlflow = None
        if track.mlflow:
            uri = track.mlflow_uri or f"sqlite:///{output_dir / 'mlflow.db'}"
            self.mlflow = MlflowWriter(uri, run_dir.name, mlflow_run, config)
        self.config = config
        # The next round to begin; a step below it is a later step of a round already recorded (the
        # plan's final PM evaluation under the last round), which adds its metrics but not its round/* costs.
        self.next_step = first_step

    @property
    def mlflow_run(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None

    def step(
        self,
        step: int,
        gm: Mapping | None,
        pm: Mapping | None,
        train: Mapping | None,
        extras: Mapping[str, float] | None,
        last: bool = False,
    ) -> None:
        scalars = step_scalars(gm, pm, train, extras)
        if step < self.next_step:
            scalars = {tag: value for tag, value in scalars.items() if not tag.startswith("round/")}
        self.next_step = max(self.next_step, step + 1)
        if self.tensorboard:
            self.tensorboard.step(step, scalars, gm, pm, last)
        if self.mlflow:
            self.mlflow.step(step, scalars)

    def finish(self, final: Mapping[str, Any]) -> None:
        metrics = {
            f"final/{model}_{key}": float(value)
            for model in ("gm", "pm")
            for key, value in (final.get(model) or {}).items()
            if key in ("all", "many", "medium", "few", "balancedness") and isinstance(value, (int, float))
        }
        if self.tensorboard:
            self.tensorboard.finish(self.config, metrics, max(self.next_step - 1, 0))
        if self.mlflow:
            self.mlflow.finish(metrics, max(self.next_step - 1, 0))
