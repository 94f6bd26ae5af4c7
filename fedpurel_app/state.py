"""Durable private state of one node, on its own disk (node-config ``state-dir``).

``context.state`` lives only as long as a run and a SuperNode process: a node
that restarts, or a new run, starts from nothing. What a node must keep across
both (its private residual phi_k, and optionally its cached features) goes to a
folder that only this node reads:

    store = NodeStateStore(node.state_dir, fingerprint(cfg, "state", partition_id=..., ...))
    phi_k = store.load("phi_k")          # None when absent
    store.save("phi_k", peft.private_state())

Files are safetensors, written atomically (a temp file in the same folder,
fsync, rename, fsync of the folder): a crash mid-write leaves the previous file
intact. The folder is owner-only (0o700) and files 0o600. Each file's header
metadata carries the *state key*, the run config's ``"state"`` fingerprint
(:func:`fedpurel_app.config.fingerprint`: everything that determines what the
tensors mean, the model, the PEFT variant and its shape options, the dataset,
the node's partition...); a file written under another key, or a damaged file,
is refused with a :class:`StateError` that says which file, why, and what to do.

Pure library code: no Flower imports.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import fingerprint_diff
from .errors import StateError
from .storage import save_tensors_atomic

FORMAT = "fedpurel-node-state/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_META_FORMAT = "fedpurel.format"
_META_KEY = "fedpurel.state-key"
_META_FIELDS = "fedpurel.state-fields"
_META_NAME = "fedpurel.name"
_META_DIGEST = "fedpurel.sha256"
SUFFIX = ".safetensors"


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes (detects damaged data, not just headers)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class NodeStateStore:
    """Named tensor dicts of one node in ``state_dir``, tied to a state key."""

    def __init__(self, state_dir: str | os.PathLike, key: Mapping[str, str]) -> None:
        """``key``: ``{"key": ..., "fields": ...}``, a :func:`~fedpurel_app.config.fingerprint`."""
        if not str(state_dir):
            raise StateError("state-dir is empty: set node-config state-dir to a folder of this node")
        self.dir = Path(state_dir).expanduser()
        self.key = dict(key)
        self._prepare_dir()

    # -- folder ----------------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StateError(f"cannot create state-dir {self.dir}: {err.strerror}") from None
        info = self.dir.stat()
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"state-dir {self.dir} is not a folder")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise StateError(
                f"state-dir {self.dir} belongs to uid {info.st_uid}, not to this process (uid {os.getuid()}): "
                "private state must live in a folder owned by the SuperNode's user"
            )
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(self.dir, 0o700)

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise StateError(f"invalid state name {name!r}: use letters, digits, '_', '.', '-' (no paths)")
        return self.dir / f"{name}{SUFFIX}"

    # -- write -----------------------------------------------------------------------------

    def save(self, name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write ``tensors`` as ``<state-dir>/<name>.safetensors``, atomically, mode 0o600."""
        target = self.path(name)
        if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise StateError(f"state {name!r}: expected a dict of tensors")
        # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
        data = {str(k): v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        metadata = {
            _META_FORMAT: FORMAT,
            _META_NAME: name,
            _META_KEY: self.key["key"],
            _META_FIELDS: self.key["fields"],
            _META_DIGEST: _digest(data),
        }
        save_tensors_atomic(data, target, metadata, mode=0o600)
        _fsync_dir(self.dir)
        return target

    # -- read ------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``name``; None when there is none. Refuses foreign or damaged files."""
        path = self.path(name)
        if not path.is_file():
            return None
        damaged = (
            f"state file {path} is damaged or not a FedPuReL state file ({{}}); "
            "delete it to start this node's private state afresh"
        )
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except OSError as err:
            raise StateError(f"cannot read state file {path}: {err.strerror or err}") from None
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise StateError(damaged.format(err)) from None
        if metadata.get(_META_FORMAT) != FORMAT:
            raise StateError(damaged.format(f"format {metadata.get(_META_FORMAT)!r}, expected {FORMAT!r}"))
        if metadata.get(_META_KEY) != self.key["key"]:
            raise StateError(self._mismatch(path, metadata))
        if metadata.get(_META_DIGEST) != _digest(tensors):
            raise StateError(damaged.format("checksum mismatch: its tensor data changed after it was written"))
        return {k: v.to(device) for k, v in tensors.items()}

    def _mismatch(self, path: Path, metadata: Mapping[str, str]) -> str:
        diff = fingerprint_diff(metadata.get(_META_FIELDS, "{}"), self.key["fields"])
        detail = "; ".join(diff) if diff else f"key {metadata.get(_META_KEY)!r} != {self.key['key']!r}"
        return (
            f"state file {path} was written for a different configuration ({detail}). "
            "Refusing to load it: use another state-dir for this configuration, or delete the file"
        )

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass
