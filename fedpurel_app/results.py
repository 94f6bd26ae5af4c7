"""results.json and the end-of-run table.

One folder per run under ``output-dir``; ``results.json`` holds the config,
zero-shot and final GM/PM metrics, means over the last 10 GM evaluations and
one entry per round (phase, metrics, purification statistics, wall time).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

GROUPS = ("all", "many", "medium", "few", "balancedness")


def new_run_dir(output_dir: Path, label: str) -> Path:
    """A fresh folder ``<output_dir>/<UTC time>-<label>`` (suffixed if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = output_dir / f"{stamp}-{label}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


class RunRecorder:
    """Collects what a run measures and writes it to ``results.json`` as it goes."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {
            "config": config,
            "zero_shot": {},
            "rounds": [],
            "final": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def zero_shot(self, gm: dict[str, Any], pm: dict[str, Any] | None = None) -> None:
        self.data["zero_shot"] = {"gm": gm, **({"pm": pm} if pm else {})}
        self.save()

    def add_round(self, round_: int, phase: str, **entries: Any) -> dict[str, Any]:
        """Record one round: ``gm``, ``pm``, ``train`` (purification stats), ``tkl``..."""
        record = {"round": round_, "phase": phase, **{k: v for k, v in entries.items() if v is not None}}
        record["wall_time"] = round(self.elapsed(), 3)
        self.data["rounds"].append(record)
        self.save()
        return record

    def finish(self, phi_g: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Fill ``final`` from the recorded rounds, save phi_g and results.json."""
        gm_rounds = [r["gm"] for r in self.data["rounds"] if "gm" in r]
        pm_rounds = [r["pm"] for r in self.data["rounds"] if "pm" in r]
        final: dict[str, Any] = {"wall_time": round(self.elapsed(), 3)}
        if gm_rounds:
            final["gm"] = gm_rounds[-1]
            last10 = gm_rounds[-10:]
            final["gm_last10"] = {key: _mean([g.get(key) for g in last10]) for key in GROUPS}
        if pm_rounds:
            final["pm"] = pm_rounds[-1]
            last10 = pm_rounds[-10:]
            final["pm_last10"] = {key: _mean([p.get(key) for p in last10]) for key in (*GROUPS, "all_weighted")}
        self.data["final"] = final
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in phi_g.items()}, str(self.run_dir / "phi_g.safetensors"))
        self.save()
        return final

    def save(self) -> None:
        write_json_atomic(self.run_dir / "results.json", self.data)

    def table(self) -> str:
        """Zero-shot vs final, in percent: GM All/Many/Medium/Few/Balancedness, PM All."""
        zero_shot, final = self.data["zero_shot"], self.data["final"]

        def pct(value: float | None) -> str:
            return "     -" if value is None else f"{100 * value:6.2f}"

        def row(name: str, gm: dict, pm: dict) -> str:
            return f"{name:<10}" + "".join(f" {pct(gm.get(k))}" for k in GROUPS) + f" {pct(pm.get('all'))}"

        header = f"{'':<10}" + "".join(f" {k.upper()[:6]:>6}" for k in GROUPS) + f" {'PM ALL':>6}"
        return "\n".join(
            [
                "GM: accuracy (%) of the global model on the balanced test set; "
                "PM: personalized accuracy, mean over clients",
                header,
                row("zero-shot", zero_shot.get("gm", {}), zero_shot.get("pm", {})),
                row("final", final.get("gm", {}), final.get("pm", {})),
            ]
        )
