"""The message protocol: what every reply of every handler of every method carries, and nothing more.

A client's label distribution and predictions stay on the client: a reply
holds per-class counts and scalars, never a per-sample array, and never phi_k
or another private tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app import app as client
from fedpurel_app import protocol
from fedpurel_app.data.client import client_data
from fedpurel_app.inputs import clip_of
from fedpurel_app.peft.base import build_peft
from fedpurel_app.protocol import EvaluateReply, Evaluation, Instruction, PersonalizeReply, ProtocolError, TrainReply
from fedpurel_app.registry import METHODS
from tests.conftest import SMALL_RUN, make_cfg
from tests.fake_grid import set_task_identity

NUM_CLASSES = 20  # the embedded default; no client split below has this many samples
RUN = {**SMALL_RUN, "data.client-test-size": 27, "personalize.epochs": 1}


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    set_task_identity(monkeypatch)


def message(kind: str, phi_g: dict | None, rnd: int, evaluate: bool = False, counts=None) -> Message:
    content = {protocol.CONFIG: ConfigRecord(Instruction(rnd, "", counts, evaluate).to_config())}
    if phi_g is not None:
        content[protocol.ARRAYS] = ArrayRecord(phi_g)
    return Message(RecordDict(content), dst_node_id=100, message_type=kind)


@pytest.mark.parametrize("method", METHODS.names())
def test_no_reply_of_any_handler_of_any_method_holds_per_sample_data_or_private_tensors(method):
    cfg = make_cfg({**RUN, "method.name": method})
    from fedpurel_app.config import NodeConfig
    from fedpurel_app.data.client import class_counts

    data = client_data(cfg.data, cfg.seed, NodeConfig(partition_id=0, num_partitions=4))
    sizes = {len(data.train), len(data.test)}
    assert NUM_CLASSES not in sizes, "choose splits whose sizes differ from the number of classes"
    phi_g = build_peft(cfg, clip_of(cfg.model, cfg.data), data.classnames, data.template).global_state()
    counts = [int(c) for c in class_counts(cfg.data, cfg.seed)]
    context = Context(
        run_id=1,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config={**RUN, "method.name": method},
    )
    # every handler the method's plan sends to, in the plan's order
    from fedpurel_app.methods.base import build_method

    steps = build_method(cfg, counts).plan().steps
    trains, personalizes = any(s.train for s in steps), any(s.personalize for s in steps)
    replies = [
        client.query(message(protocol.QUERY, None, 0), context),
        client.evaluate(message(protocol.EVALUATE, phi_g, 0, counts=counts), context),
    ]
    if trains:
        replies.append(client.train(message(protocol.TRAIN, phi_g, 1, counts=counts), context))
    if personalizes:
        replies.append(client.personalize(message(protocol.PERSONALIZE, phi_g, 2, counts=counts), context))
        replies.append(
            client.personalize(message(protocol.PERSONALIZE, phi_g, 3, evaluate=True, counts=counts), context)
        )
    replies.append(client.evaluate(message(protocol.EVALUATE, phi_g, 3, counts=counts), context))
    private = [
        array.numpy()
        for name, record in context.state.array_records.items()
        if name in ("fedpurel.phi_k", "fedpurel.method-state")
        for array in record.values()
    ]
    assert private or not (personalizes or method == "promptfolio"), "the node holds private state"
    for reply in replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        for name, record in reply.content.array_records.items():
            assert reply.metadata.message_type == protocol.TRAIN and name == protocol.ARRAYS
            assert set(record.keys()) == set(phi_g), "a train reply carries something other than phi_g"
        for metrics in reply.content.metric_records.values():
            for key, value in metrics.items():
                if isinstance(value, list):
                    assert len(value) == NUM_CLASSES, f"'{key}' is not per class: {len(value)} values"
                flat = np.asarray(value, dtype=np.float64).ravel()
                for tensor in private:
                    if tensor.size == flat.size and tensor.size > 1:
                        assert not np.allclose(flat, tensor.ravel()), f"'{key}' carries a private tensor"
    # and every reply reads back through the protocol, as the server reads it
    metrics = [dict(r.content.metric_records[protocol.METRICS]) for r in replies]
    protocol.Identity.read(metrics.pop(0))
    assert EvaluateReply.read(metrics.pop(0), NUM_CLASSES).evaluation.num_examples == len(data.test)
    if trains:
        assert TrainReply.read(metrics.pop(0), 10**6).num_examples == len(data.train)
    if personalizes:
        assert PersonalizeReply.read(metrics.pop(0), NUM_CLASSES, evaluated=False).evaluation is None
        assert PersonalizeReply.read(metrics.pop(0), NUM_CLASSES, evaluated=True).evaluation.personalized
    last = EvaluateReply.read(metrics.pop(0), NUM_CLASSES).evaluation
    assert last.personalized == (personalizes or method == "promptfolio")


def evaluation_metrics(**change) -> dict:
    good = Evaluation(True, (1, 0, 2), (1, 1, 0), (0, 1, 1), (2, 1, 2))
    return {**EvaluateReply(0, good).to_metrics(), **change}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"labels": [0, 1, 2, 2, 1]}, "unexpected metrics"),
        ({"pm-correct": [1, 0]}, "per-class counts"),
        ({"pm-correct": [3, 0, 2]}, "more correct predictions than test samples"),
        ({"gm-correct": [1, -1, 0]}, "whole numbers"),
        ({"zs-correct": [0.5, 1, 1]}, "whole numbers"),
        ({"personalized": 2}, "'personalized'"),
        ({"num-examples": 4}, "sum of 'class-total'"),
        ({"restored": 3}, "'restored'"),
    ],
)
def test_a_bad_evaluation_reply_is_refused_saying_why(change, problem):
    EvaluateReply.read(evaluation_metrics(), 3)
    with pytest.raises(ProtocolError, match=problem):
        EvaluateReply.read(evaluation_metrics(**change), 3)


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({"num-examples": 0, "partition-id": 0}, "num-examples"),
        ({"num-examples": 2.5, "partition-id": 0}, "num-examples"),
        ({"num-examples": True, "partition-id": 0}, "num-examples"),
        ({"num-examples": 10**7, "partition-id": 0}, "num-examples"),
        ({"num-examples": 5, "partition-id": 0, "task-loss": float("nan")}, "finite"),
        ({"num-examples": 5, "partition-id": 0, "preds": [1, 2]}, "unexpected metrics"),
    ],
)
def test_a_bad_train_reply_is_refused_saying_why(metrics, problem):
    with pytest.raises(ProtocolError, match=problem):
        TrainReply.read(metrics, 10**6)


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"ctx": np.ones((2, 3), np.float32), "phi_k.ctx": np.ones((2, 3), np.float32)}, "extra"),
        ({"ctx": np.ones((3, 3), np.float32)}, "shape"),
        ({"ctx": np.ones((2, 3), np.float64)}, "dtype"),
        ({"ctx": np.full((2, 3), np.inf, np.float32)}, "NaN or Inf"),
    ],
)
def test_a_train_reply_must_hold_exactly_phi_g(arrays, problem):
    protocol.check_phi_g({"ctx": np.ones((2, 3), np.float32)}, {"ctx": (2, 3)})
    with pytest.raises(ProtocolError, match=problem):
        protocol.check_phi_g(arrays, {"ctx": (2, 3)})


def test_an_instruction_round_trips_and_refuses_unknown_keys():
    instruction = Instruction(7, "run-x", (3, 2, 1), True)
    assert Instruction.read(instruction.to_config()) == instruction
    with pytest.raises(ProtocolError, match="unexpected"):
        Instruction.read({**instruction.to_config(), "lr": 0.1})
    with pytest.raises(ProtocolError, match="class-counts"):
        Instruction.read({"server-round": 1, "class-counts": [1, -2]})


def test_a_user_error_on_a_client_is_an_error_reply_with_its_message(monkeypatch):
    context = Context(
        run_id=1,
        node_id=100,
        node_config={"partition-id": 5, "num-partitions": 4},
        state=RecordDict(),
        run_config=dict(RUN),
    )
    reply = client.evaluate(message(protocol.EVALUATE, {"ctx": torch.zeros(4, 64)}, 0), context)
    assert reply.has_error() and reply.error.code == protocol.USER_ERROR
    assert "partition-id (5) must be smaller than num-partitions (4)" in reply.error.reason
