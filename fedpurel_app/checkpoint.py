"""The ServerApp's checkpoint: what a killed run needs to resume at the next round.

After every completed round the server writes, under ``<run dir>/checkpoint/``:

- ``phi_g-round<k>.safetensors``: the global PEFT parameters after round k
  (:func:`storage.save_tensors_atomic`);
- ``state.json`` (written atomically after the tensors): the round k, its phase,
  the run config, the results so far and the SHA-256 of the tensor file, plus a
  SHA-256 of the whole state (an integrity check against corruption and
  accidental edits, not an authentication: whoever can write the folder can
  recompute it).

Older tensor files are removed once ``state.json`` points at the new one, so a
kill at any instant leaves a consistent pair. The strategy's client sampling
is a pure function of (seed, round), and every client's local training of
round r is seeded by (seed, stage, r, partition), so the round number is all
the random state there is. Client-side state (the private residual phi_k and
the cached features, in each SuperNode's ``context.state``) is not part of
this checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .results import write_json_atomic
from .storage import save_tensors_atomic

FORMAT = 1
STATE = "state.json"
# Keys that may differ between the killed run and the resumed one: they do not
# change what the run computes.
OPERATIONAL_KEYS = ("resume-from", "output-dir", "round-timeout")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    phase: str
    phi_g: dict[str, torch.Tensor]
    results: dict[str, Any]


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in OPERATIONAL_KEYS}


def _digest(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "state-sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(
    run_dir: Path, round_: int, phase: str, phi_g: dict[str, torch.Tensor],
    config: dict[str, Any], results: dict[str, Any],
) -> Path:
    """Write the state after ``round_`` atomically; returns the checkpoint folder."""
    folder = run_dir / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"phi_g-round{round_}.safetensors"
    save_tensors_atomic(phi_g, folder / name, metadata={"round": str(round_), "phase": phase})
    state = {
        "format": FORMAT,
        "round": round_,
        "phase": phase,
        "phi_g": name,
        "phi_g-sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
        "config": config,
        "results": results,
    }
    state["state-sha256"] = _digest(state)
    write_json_atomic(folder / STATE, state)
    for old in folder.glob("phi_g-round*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder


def load_checkpoint(
    run_dir: Path, config: dict[str, Any], phi_g_shapes: dict[str, tuple[int, ...]]
) -> Checkpoint:
    """The last completed round of ``run_dir``, checked against ``config`` and phi_g's shapes.

    Raises :class:`CheckpointError` (one message, no traceback needed) when the
    folder has no checkpoint, the checkpoint is corrupt or was edited, or the
    config differs from the one the run was started with.
    """
    folder = run_dir / "checkpoint"
    where = f"cannot resume from '{run_dir}'"
    if not (folder / STATE).is_file():
        raise CheckpointError(
            f"{where}: no {folder / STATE}; resume-from must be a run folder written by a run "
            "that completed at least one round (<output-dir>/<time>-<label>)"
        )
    try:
        state = json.loads((folder / STATE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{where}: {folder / STATE} is corrupt ({err}); start a new run") from None
    if state.get("format") != FORMAT or state.get("state-sha256") != _digest(state):
        raise CheckpointError(
            f"{where}: {folder / STATE} fails its integrity check (edited or corrupt); start a new run"
        )
    tensors = folder / str(state["phi_g"])
    if not tensors.is_file() or hashlib.sha256(tensors.read_bytes()).hexdigest() != state["phi_g-sha256"]:
        raise CheckpointError(
            f"{where}: {tensors} is missing or does not match the checksum in {STATE} "
            "(edited or corrupt); start a new run"
        )
    ours, theirs = _comparable(config), _comparable(state["config"])
    changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if changed:
        details = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"{where}: the run config differs from the checkpoint's ({details}); resume with the "
            "same config (only resume-from, output-dir and round-timeout may change) or start a new run"
        )
    from safetensors.torch import load_file

    phi_g = load_file(str(tensors))
    shapes = {k: tuple(v.shape) for k, v in phi_g.items()}
    if shapes != dict(phi_g_shapes):
        raise CheckpointError(f"{where}: phi_g has shapes {shapes}, the model expects {dict(phi_g_shapes)}")
    return Checkpoint(int(state["round"]), str(state["phase"]), phi_g, state["results"])
