"""The mistakes a user can make, as one family of exceptions.

Every error whose cause is in the user's hands (the run config, a node's
config, the model or its weights, the data, a checkpoint, a node's state
folder) is a :class:`UserError`. Its message names the problem and what to
do. The apps end a run on a ``UserError`` with that one message and no
traceback, and Flower records the run as failed; any other exception is a
bug and keeps its traceback.

Pure library code: no Flower imports.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A bad run config: unknown keys, bad values, impossible combinations."""


class NodeConfigError(ConfigError):
    """A bad SuperNode node-config (``partition-id``, ``num-partitions``, ``state-dir``, ``data-dir``)."""


class ModelLoadError(UserError, ValueError):
    """A model or its weights cannot be loaded (unknown name, missing file, offline)."""


class DataError(UserError, ValueError):
    """A dataset cannot be read or cannot give what the protocol asks of it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed (missing, damaged, another config)."""


class StateError(UserError, ValueError):
    """A node's state file or folder that cannot be used (other config, damaged, unsafe)."""


class ClientError(UserError):
    """Every client that replied reported a user error of its own (its message is kept)."""


__all__ = [
    "CheckpointError",
    "ClientError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "NodeConfigError",
    "StateError",
    "UserError",
]
