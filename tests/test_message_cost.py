"""bench/message_cost.py's accounting: nested spans counted once, a node's message matched to its
SuperExec launch and ClientApp process, rows that add up to the message's time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from message_cost import Span, exclusive, in_window, parse, probe, rows  # noqa: E402


def test_exclusive_counts_nested_spans_once():
    spans = [
        Span("handler", 10.0, 20.0, 8.0),
        Span("clip load", 11.0, 14.0, 2.5),
        Span("import open_clip", 11.5, 12.5, 1.0),  # inside the CLIP load
        Span("training", 15.0, 19.0, 3.0),
        Span("push", 21.0, 21.5, 0.1),  # disjoint
    ]
    got = {name: (round(wall, 6), round(cpu, 6)) for name, wall, cpu in exclusive(spans)}
    assert got == {
        "handler": (3.0, 2.5),
        "clip load": (2.0, 1.5),
        "import open_clip": (1.0, 1.0),
        "training": (4.0, 3.0),
        "push": (0.5, 0.1),
    }
    assert sum(w for _, w, _ in exclusive(spans)) == pytest.approx(10.5)


def test_exclusive_same_interval_counted_in_the_inner_one():
    # Two wrappers of one call (a wrapper of a wrapper): the inner one ends, and is written, first.
    spans = [Span("inner", 1.0, 2.0, 0.5), Span("outer", 1.0, 2.0, 0.5)]
    assert [(n, round(w, 6)) for n, w, _ in exclusive(spans)] == [("inner", 1.0), ("outer", 0.0)]


def events_of_one_message(kind: str = "train", offset: float = 0.0) -> list[tuple[float, str, str, str]]:
    """A SuperNode (pid 10) with its SuperExec (11) running one ClientApp process (12)."""
    t = offset
    return [
        (t + 0.0, "10", "flower-supernode", "start"),
        (t + 0.0, "11", "flower-superexec", "ppid 10"),
        (t + 1.0, "10", "flower-supernode", f"node receiving {kind}"),
        (t + 1.2, "11", "flower-superexec", "launch"),
        (t + 1.5, "12", "flwr-clientapp", "ppid 11"),
        (t + 1.5, "12", "flwr-clientapp", "start"),
        (t + 1.5, "12", "flwr-clientapp", "cpu at start 0.0500 s"),
        (t + 2.5, "12", "flwr-clientapp", "enter run_clientapp (cpu 0.9000 s)"),
        (t + 2.8, "12", "flwr-clientapp", "pull (wall 0.3000 s, cpu 0.1000 s)"),
        (t + 2.9, "12", "flwr-clientapp", "fab install (wall 0.1000 s, cpu 0.0500 s)"),
        (t + 4.9, "12", "flwr-clientapp", "import torch (wall 1.5000 s, cpu 1.4000 s)"),
        (t + 4.9, "12", "flwr-clientapp", "import client_app.app (wall 1.9000 s, cpu 1.8000 s)"),
        (t + 4.95, "12", "flwr-clientapp", "app import (wall 2.0000 s, cpu 1.9000 s)"),
        (t + 6.0, "12", "flwr-clientapp", "clip load (wall 0.8000 s, cpu 0.7000 s)"),
        (t + 7.0, "12", "flwr-clientapp", "training (wall 0.5000 s, cpu 0.5000 s)"),
        (t + 7.1, "12", "flwr-clientapp", "handler (wall 2.1000 s, cpu 1.5000 s)"),
        (t + 7.3, "12", "flwr-clientapp", "push (wall 0.1000 s, cpu 0.0500 s)"),
        (t + 7.5, "12", "flwr-clientapp", "cpu at exit 4.8000 s"),
        (t + 7.6, "10", "flower-supernode", f"node sending {kind}"),
        (t + 7.9, "10", "flower-supernode", "node sent"),
    ]


def test_parse_and_rows_add_up_to_the_message():
    (msg,) = parse(events_of_one_message())
    assert (msg.node, msg.kind, msg.launch) == ("10", "train", 1.2)
    assert msg.process is not None and msg.process.pid == "12"
    assert msg.total == pytest.approx(6.9)
    got = rows(msg)
    assert sum(wall for wall, _ in got.values()) == pytest.approx(msg.total)
    assert sum(cpu for _, cpu in got.values() if cpu is not None) == pytest.approx(4.8)  # the process's CPU
    assert got["app import (torch, the library)"][0] == pytest.approx(2.0)
    assert got["model build (CLIP load, PEFT build)"] == pytest.approx((0.8, 0.7))
    assert got["handler, the rest"][0] == pytest.approx(2.1 - 0.8 - 0.5)
    picked_up = got["node: reply picked up (polls every 0.5 s; may overlap the push)"][0]
    assert picked_up == pytest.approx(7.6 - 7.3)  # the push ended at 7.3


def test_a_message_without_its_process_has_no_rows():
    events = [e for e in events_of_one_message() if e[1] != "12"]
    (msg,) = parse(events)
    assert msg.process is None and rows(msg) == {}


def test_in_window_marks_each_nodes_first_message():
    events = events_of_one_message("train") + [
        (t + 10.0, pid.replace("12", "13"), name, what)
        for t, pid, name, what in events_of_one_message("train")
        if pid != "10" or "node" in what
    ]
    messages = parse(sorted(events))
    assert len(messages) == 2 and messages[1].process is not None and messages[1].process.pid == "13"
    chosen = in_window(messages, (0.0, 100.0))
    assert [m.first for m in chosen] == [True, False]
    assert in_window(messages, (5.0, 100.0))[0].first


def test_probe_compiles():
    compile(probe(), "sitecustomize.py", "exec")
