"""The ServerApp's checkpoint: what a killed run needs to resume at the next round.

After every completed step of the round plan (:mod:`fedpurel_app.plan`) the
server writes, under ``<run dir>/checkpoint/``:

- ``phi_g-step<k>.safetensors``: the global PEFT parameters after step k
  (:func:`storage.save_tensors_atomic`);
- ``state.json`` (written atomically after the tensors): the step k, its round
  and phase, the run config's ``"checkpoint"`` fingerprint (every key but the
  operational ones, :func:`fedpurel_app.config.fingerprint`), the results so
  far and the SHA-256 of the tensor file, plus a SHA-256 of the whole state (an
  integrity check against corruption and accidental edits, not an
  authentication: whoever can write the folder can recompute it).

Older tensor files are removed once ``state.json`` points at the new one, so a
kill at any instant leaves a consistent pair. The strategy's client sampling
is a pure function of (seed, round), and every client's local training of
round r is seeded by (seed, stage, r, partition), so the step is all the
random state there is. Client-side state (the private residual phi_k, in each
node's memory and state folder, and its cached features) is not part of this
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import fingerprint_diff
from .errors import CheckpointError
from .results import write_json_atomic
from .storage import save_tensors_atomic

FORMAT = 2
STATE = "state.json"


@dataclass(frozen=True)
class Checkpoint:
    step: int  # the index of the last completed step of the round plan
    round: int
    phase: str
    phi_g: dict[str, torch.Tensor]
    results: dict[str, Any]


def _digest(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "state-sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(
    run_dir: Path,
    step: int,
    round_: int,
    phase: str,
    phi_g: dict[str, torch.Tensor],
    config_key: dict[str, str],
    results: dict[str, Any],
) -> Path:
    """Write the state after step ``step`` (round ``round_``) atomically; returns the folder.

    ``config_key``: the run config's ``"checkpoint"`` fingerprint."""
    folder = run_dir / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"phi_g-step{step}.safetensors"
    save_tensors_atomic(phi_g, folder / name, metadata={"step": str(step), "round": str(round_), "phase": phase})
    state = {
        "format": FORMAT,
        "step": step,
        "round": round_,
        "phase": phase,
        "phi_g": name,
        "phi_g-sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
        "config-key": config_key["key"],
        "config-fields": config_key["fields"],
        "results": results,
    }
    state["state-sha256"] = _digest(state)
    write_json_atomic(folder / STATE, state)
    for old in folder.glob("phi_g-step*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder


def load_checkpoint(run_dir: Path, config_key: dict[str, str], phi_g_shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    """The last completed step of ``run_dir``, checked against the config's fingerprint and phi_g's shapes.

    Raises :class:`CheckpointError` (one message, no traceback needed) when the
    folder has no checkpoint, the checkpoint is corrupt or was edited, or the
    config differs from the one the run was started with.
    """
    folder = run_dir / "checkpoint"
    where = f"cannot resume from '{run_dir}'"
    if not (folder / STATE).is_file():
        raise CheckpointError(
            f"{where}: no {folder / STATE}; resume-from must be a run folder written by a run "
            "that completed at least one step (<output-dir>/<time>-<label>)"
        )
    try:
        state = json.loads((folder / STATE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{where}: {folder / STATE} is corrupt ({err}); start a new run") from None
    if state.get("format") != FORMAT or state.get("state-sha256") != _digest(state):
        raise CheckpointError(
            f"{where}: {folder / STATE} fails its integrity check (edited, corrupt or of another version); "
            "start a new run"
        )
    tensors = folder / str(state["phi_g"])
    if not tensors.is_file() or hashlib.sha256(tensors.read_bytes()).hexdigest() != state["phi_g-sha256"]:
        raise CheckpointError(
            f"{where}: {tensors} is missing or does not match the checksum in {STATE} "
            "(edited or corrupt); start a new run"
        )
    if state["config-key"] != config_key["key"]:
        details = ", ".join(fingerprint_diff(state["config-fields"], config_key["fields"])) or "its fingerprint"
        raise CheckpointError(
            f"{where}: the run config differs from the checkpoint's ({details}); resume with the "
            "same config (only resume-from, output-dir and round-timeout may change) or start a new run"
        )
    from safetensors.torch import load_file

    phi_g = load_file(str(tensors))
    shapes = {k: tuple(v.shape) for k, v in phi_g.items()}
    if shapes != dict(phi_g_shapes):
        raise CheckpointError(f"{where}: phi_g has shapes {shapes}, the model expects {dict(phi_g_shapes)}")
    return Checkpoint(int(state["step"]), int(state["round"]), str(state["phase"]), phi_g, state["results"])
