"""Bare ServerApp: `rounds` rounds of train messages to every connected node; each reply must
hold the sent array + 1 (the run fails otherwise). Numpy only."""

import time
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .client_app import ARRAYS

app = ServerApp()


def exchange(grid: Grid, messages: list[Message], interval: float, timeout: float) -> list[Message]:
    """Push ``messages`` and pull their replies every ``interval`` seconds until all came back."""
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < end:
        time.sleep(interval)
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in got)
    if pending:
        raise RuntimeError(f"{len(pending)} of {len(messages)} replies missing after {timeout} s")
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, floats, min_nodes = int(cfg["rounds"]), int(cfg["floats"]), int(cfg["min-nodes"])
    interval, timeout = float(cfg["pull-interval"]), float(cfg["round-timeout"])
    end = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > end:
            raise RuntimeError(f"only {len(nodes)} of {min_nodes} nodes connected")
        time.sleep(0.2)
    value = np.zeros(floats, dtype=np.float32)
    for rnd in range(1, rounds + 1):
        started = time.perf_counter()
        content = RecordDict({ARRAYS: ArrayRecord({"x": Array(value)})})
        messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
        replies = exchange(grid, messages, interval, timeout)
        errors = [reply.error.reason for reply in replies if reply.has_error()]
        if errors:
            raise RuntimeError(f"round {rnd}: error replies: {errors}")
        arrays = [reply.content[ARRAYS]["x"].numpy() for reply in replies]
        if not all(np.array_equal(array, value + 1) for array in arrays):
            raise RuntimeError(f"round {rnd}: a reply is not the sent array + 1")
        value = np.mean(arrays, axis=0, dtype=np.float32)
        log(INFO, "[bare] round %d: %d replies in %.2f s", rnd, len(replies), time.perf_counter() - started)
    log(INFO, "[bare] done: %d rounds on %d nodes, array = %g", rounds, len(nodes), float(value[0]))
