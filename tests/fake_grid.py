"""A Flower Grid whose SuperNodes are the ClientApp's handlers, called in this process.

The ServerApp's real plan executor runs against it: every message goes
through the same ClientApp (its handlers and their mods), records and checks as in Flower, without
processes or a network. ``kill_at_round`` makes the grid raise while a step
of that round is sent (the server dies there); ``node_id`` renumbers nodes,
as a restart does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from client_app import app as client
from fedpurel_app import protocol
from fedpurel_app.config import parse_run_config
from server_app import app as server


class Killed(Exception):
    """The server process dies."""


class DirectGrid:
    def __init__(
        self,
        run_config: dict,
        nodes: int,
        contexts: dict[int, Context] | None = None,
        kill_at_round: int | None = None,
        state_root: Path | None = None,
        node_id: Callable[[int], int] = lambda i: 100 + i,
    ) -> None:
        def node_config(i: int) -> dict:
            extra = {"state-dir": str(state_root / f"node{i}")} if state_root else {}
            return {"partition-id": i, "num-partitions": nodes, **extra}

        self.contexts = contexts or {
            node_id(i): Context(
                run_id=1,
                node_id=node_id(i),
                node_config=node_config(i),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(nodes)
        }
        for context in self.contexts.values():
            context.run_config.clear()
            context.run_config.update(run_config)
        self.kill_at_round = kill_at_round
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            config = msg.content.config_records.get(protocol.CONFIG)  # SecAgg+'s stages carry none
            rnd = int(config["server-round"]) if config is not None else None
            if rnd is not None and rnd == self.kill_at_round and msg.metadata.message_type != protocol.QUERY:
                raise Killed(f"killed while sending round {rnd}")
            msg.metadata.__dict__["_message_id"] = f"{len(self.sent)}-{rnd}-{msg.metadata.message_type}-{i}"
            msg.content = copy.deepcopy(msg.content)  # as the wire does: the node gets its own copy
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            reply = self.reply(msg)
            if reply is not None:
                self.received.append(reply)
                self.replies[msg.metadata.message_id] = reply
        return ids

    def reply(self, msg: Message) -> Message | None:
        """What the node answers to ``msg`` (None: it never answers): the ClientApp itself, with the
        handler its message type names and that handler's mods."""
        return client.app(msg, self.contexts[msg.metadata.dst_node_id])

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def run_server(run_config: dict, grid: DirectGrid) -> None:
    """The ServerApp's main on ``run_config`` (flat dotted keys, as Flower gives it)."""
    from flwr.common.config import unflatten_dict

    from fedpurel_app.server import ServerRun

    cfg = parse_run_config(unflatten_dict(dict(run_config)))
    server._execute(grid, ServerRun(cfg, server.APP_DIR))


def only_run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def set_task_identity(patch) -> None:
    """Messages are built outside a Flower process here: give them the identity one would have."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        patch.setattr(TaskIdentity, name, value)
