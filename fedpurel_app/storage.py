"""Files that must never be seen half-written or written twice at once.

- :func:`file_lock`: an exclusive inter-process lock (POSIX ``flock``).
- :func:`save_tensors_atomic`: safetensors written to a temporary file in the
  target folder, fsynced, then renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename still prevents torn reads
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def save_tensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None, mode: int | None = None
) -> None:
    """Write ``tensors`` as safetensors at ``path`` atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    data = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(data, tmp, metadata=dict(metadata or {}))
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
