"""Send messages to SuperNodes and collect their replies, polling the SuperLink often.

``Grid.send_and_receive`` of the gRPC grid a deployed ServerApp uses waits 3 s
between two pulls of replies, so every exchange (a round's training, a
personalization round, an evaluation) ends up to 3 s after its last reply.
This does the same with Flower's public ``push_messages`` / ``pull_messages``
and a short pull interval (the one Flower's in-memory simulation grid uses).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.1


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, pull_interval: float = PULL_INTERVAL_S
) -> list[Message]:
    """Push ``messages``, then pull replies until all arrived or ``timeout`` seconds passed."""
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(msg.metadata.reply_to_message_id for msg in got)
        if not pending or time.monotonic() >= end:
            break
        time.sleep(pull_interval)
    return replies
