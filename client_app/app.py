"""FedPuReL ClientApp: unpack a message, call the library, pack the reply.

Every handler validates the run config and the node config, then hands the
message's phi_g and :class:`~fedpurel_app.protocol.Instruction` to
:class:`fedpurel_app.client.Client` with the node's ``context.state`` as its
memory, and packs what it returns (:mod:`fedpurel_app.protocol` says what
each reply carries: never phi_k, never anything per sample).

Handlers:

- ``train``               Stage 1: the method's (purified) local update of phi_g; replies phi_g
                          (in a DP run clipped to the clipping norm by Flower's fixedclipping_mod);
                          in a SecAgg+ round (``secagg.enabled``) it takes part in Flower's four
                          SecAgg+ stages and replies its masked update (client_app/secagg.py).
- ``train.personalize``   Stage 2: the method's personalization of its private parameters
                          against the received (frozen) phi_g; replies metrics only (with the
                          PM evaluation when the server asks for it in the same message).
- ``evaluate``            PM evaluation on the client's own test set.
- ``query``               which partition this node holds.

A :class:`~fedpurel_app.errors.UserError` (a bad node config, a node's data
folder, ...) becomes an error reply of code ``protocol.USER_ERROR`` whose
reason is its one-line message; so does an import the app makes on first use
(open_clip, peft) that fails on this machine, with the machine named
(:func:`missing_dependency`); any other exception is left to Flower.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from functools import wraps
from logging import ERROR

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import log
from flwr.common.config import unflatten_dict

from fedpurel_app import protocol
from fedpurel_app.client import Client
from fedpurel_app.config import parse_node_config, parse_run_config
from fedpurel_app.errors import UserError
from fedpurel_app.protocol import Instruction
from server_app.cluster import HINT, SUPERNODE_HINT, MissingDependencyError

from .secagg import secagg_or_dp

app = ClientApp()


class ContextMemory:
    """A node's ``context.state`` as the library's :class:`~fedpurel_app.client.Memory`."""

    PREFIX = "fedpurel."

    def __init__(self, context: Context) -> None:
        self.state = context.state  # read afresh every time: array_records is a snapshot

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        record = self.state.array_records.get(self.PREFIX + name)
        return None if record is None else record.to_torch_state_dict()

    def put(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self.state[self.PREFIX + name] = ArrayRecord(dict(tensors))

    def drop(self, name: str) -> None:
        del self.state[self.PREFIX + name]

    def names(self) -> Iterable[str]:
        return [key.removeprefix(self.PREFIX) for key in self.state.array_records if key.startswith(self.PREFIX)]


def _client(msg: Message, context: Context) -> Client:
    """Both configs validated once, and this message's instruction."""
    cfg = parse_run_config(unflatten_dict(context.run_config))
    node = parse_node_config(context.node_config)
    instruction = Instruction.read(msg.content[protocol.CONFIG])
    return Client(cfg, node, ContextMemory(context), instruction)


def _phi_g(msg: Message) -> dict[str, torch.Tensor]:
    return msg.content[protocol.ARRAYS].to_torch_state_dict()


def _reply(msg: Message, metrics: dict, arrays: dict[str, torch.Tensor] | None = None) -> Message:
    content = {protocol.METRICS: MetricRecord(metrics)}
    if arrays is not None:
        content[protocol.ARRAYS] = ArrayRecord(arrays)
    return Message(RecordDict(content), reply_to=msg)


def missing_dependency(err: ImportError) -> UserError:
    """A failed import as the user error it is: this machine lacks the app or a dependency.
    In a Ray actor (a simulation on a Ray cluster) the message names the worker's address."""
    name = err.name or str(err)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            where = f"the Ray worker at {ray.util.get_node_ip_address()}"
        except Exception:  # noqa: BLE001 - the address only helps to find the machine
            where = "this Ray worker"
        return MissingDependencyError(f"{where} cannot import '{name}': {HINT}")
    return MissingDependencyError(f"a client cannot import '{name}': {SUPERNODE_HINT}")


def _user_errors_reply(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A user error ends the message with an error reply that says what to fix, not a traceback."""

    @wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            try:
                return handler(msg, context)
            except ImportError as err:
                raise missing_dependency(err) from err
        except UserError as err:
            log(ERROR, "FedPuReL client stopped: %s", err)
            return Message(Error(protocol.USER_ERROR, f"{type(err).__name__}: {err}"), reply_to=msg)

    return wrapped


def dp_clipping(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A DP run's Stage-1 message carries the clipping norm: then Flower's ``fixedclipping_mod``
    clips this client's update to it before the reply leaves; otherwise the reply is untouched."""
    config = msg.content.config_records.get(protocol.CONFIG)
    if config is not None and protocol.CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secagg_or_dp(dp_clipping)])
@_user_errors_reply
def train(msg: Message, context: Context) -> Message:
    """Stage 1: the method's (purified) local epochs on phi_g; reply with phi_g only."""
    phi_g, reply = _client(msg, context).train(_phi_g(msg))
    return _reply(msg, reply.to_metrics(), phi_g)


@app.train("personalize")
@_user_errors_reply
def personalize(msg: Message, context: Context) -> Message:
    """Stage 2: the method's personalization of phi_k against the received, frozen phi_g."""
    return _reply(msg, _client(msg, context).personalize(_phi_g(msg)).to_metrics())


@app.evaluate()
@_user_errors_reply
def evaluate(msg: Message, context: Context) -> Message:
    """PM evaluation on the client's test set; no parameters in the reply."""
    return _reply(msg, _client(msg, context).evaluate(_phi_g(msg)).to_metrics())


@app.query()
@_user_errors_reply
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds (no data is read)."""
    node = parse_node_config(context.node_config)
    return _reply(msg, protocol.Identity(node.partition_id).to_metrics())
