"""A client machine that lacks the app or its dependencies, as one message.

In a simulation on a Ray cluster every ClientApp runs in a Ray actor on some machine of the
cluster, with that machine's Python. Flower ships the ClientApp to the actor pickled: unpickling
it imports ``client_app.app`` and, through it, ``fedpurel_app``, torch and flwr on that machine.
When one is missing there, the actor fails before any of the app's code runs; Ray reports
"At least one of the input arguments for this task could not be computed: ... No module named
'X'" with the worker's ``ip=``, Flower logs it with its traceback and turns it into an error
reply whose reason holds that text. A module the app imports later (open_clip, peft) fails
inside the ClientApp, whose handlers reply with a user error that names the module and the
machine (``client_app.app``).

:func:`dependency_error` reads either kind of reply reason; the strategy stops the run on the
first one from a Ray worker (a machine without the app fails every round), with the message of
:class:`MissingDependencyError`. :class:`RayImportTracebacks` shortens Flower's log of such a
failure to one line; it is installed on Flower's logger when this module is imported.

Pure parsing: no Ray import.
"""

from __future__ import annotations

import logging
import re

from fedpurel_app.errors import UserError

README = "README: Simulation on a Ray cluster"
HINT = f"install the same .venv and app on every machine of the cluster ({README})"
SUPERNODE_HINT = "install the app and its dependencies where that SuperNode runs (bash scripts/setup.sh)"

_NO_MODULE = re.compile(r"No module named '([^']+)'")
_CANNOT_IMPORT_NAME = re.compile(r"cannot import name '([^']+)' from '([^']+)'")
_RAY_IP = re.compile(r"\bip=([0-9A-Za-z.:\-\[\]]+?)[,)]")


class MissingDependencyError(UserError):
    """A client machine cannot import the app or one of its dependencies."""


def missing_module(text: str) -> str | None:
    """The module an import error in ``text`` names (its last mention), or None."""
    found = _NO_MODULE.findall(text)
    if found:
        return found[-1]
    names = _CANNOT_IMPORT_NAME.findall(text)
    return f"{names[-1][1]}.{names[-1][0]}" if names else None


def from_ray_worker(text: str) -> bool:
    """Whether ``text`` comes from a Ray worker (Ray's task errors name ``ray::Class.method()``)."""
    return "ray::" in text or "RaySystemError" in text or "RayTaskError" in text or "Ray worker" in text


def dependency_error(reason: str) -> MissingDependencyError | None:
    """The one-line error of a reply ``reason`` that says a client cannot import something;
    None for any other reason. A reason that is already our message is kept as it is."""
    if HINT in reason or SUPERNODE_HINT in reason:
        return MissingDependencyError(reason.removeprefix(f"{MissingDependencyError.__name__}: "))
    module = missing_module(reason)
    if module is None:
        return None
    if from_ray_worker(reason):
        ip = _RAY_IP.search(reason)
        where = f"the Ray worker at {ip.group(1)}" if ip else "a Ray worker"
        return MissingDependencyError(f"{where} cannot import '{module}': {HINT}")
    return MissingDependencyError(f"a client cannot import '{module}': {SUPERNODE_HINT}")


class RayImportTracebacks(logging.Filter):
    """Flower logs a ClientApp that could not start in a Ray actor twice: the exception (Ray's
    text, with the worker's traceback) and ``traceback.format_exc()``. For a missing module the
    first becomes one line and the second is dropped; the run then stops with one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record we cannot format is not ours to judge
            return True
        if not from_ray_worker(text) or missing_module(text) is None:
            return True
        if text.lstrip().startswith("Traceback (most recent call last)"):
            return False
        error = dependency_error(text)
        record.msg, record.args = "%s (the run stops: see the FedPuReL message)", (str(error),)
        record.exc_info, record.exc_text = None, None
        return True


_FILTER = RayImportTracebacks()
if not any(isinstance(f, RayImportTracebacks) for f in logging.getLogger("flwr").filters):
    logging.getLogger("flwr").addFilter(_FILTER)

__all__ = ["HINT", "MissingDependencyError", "RayImportTracebacks", "dependency_error", "missing_module"]
