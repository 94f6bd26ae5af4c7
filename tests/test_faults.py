"""Client faults during a whole run, through the real server plan executor (no Flower processes).

The fake grid (tests/fake_grid.py) delivers messages to the ClientApp handlers;
here some nodes crash (an error reply, as Flower sends when a ClientApp
raises), never answer (a timeout: no reply), or send a poisoned update. The
run must complete on the remaining clients, log what it dropped, and stop with
one clear error when no valid update is left in a round.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType

from fedpurel_app import protocol
from fedpurel_app.errors import ClientError
from fedpurel_app.protocol import PERSONALIZE
from tests.test_resume import RUN, DirectGrid, only_run_dir, run_server, task_identity  # noqa: F401


class FaultyGrid(DirectGrid):
    def __init__(self, run_config, faults):
        super().__init__(run_config)
        self.faults = faults  # (node, message type, round) -> "crash" | "user-error" | "silent" | "nan"

    def reply(self, msg: Message) -> Message | None:
        """A "silent" node never replies (the server waits until round-timeout)."""
        server_round = int(msg.content[protocol.CONFIG]["server-round"])
        fault = self.faults.get((msg.metadata.dst_node_id, msg.metadata.message_type, server_round))
        if fault == "silent":
            return None
        if fault == "crash":
            return Message(Error(code=0, reason="ClientApp raised RuntimeError"), reply_to=msg)
        if fault == "user-error":
            return Message(
                Error(code=protocol.USER_ERROR, reason="NodeDataError: data-dir '/x' is empty"), reply_to=msg
            )
        reply = super().reply(msg)
        if fault == "nan":
            arrays = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in arrays.items()})
        return reply


def test_a_run_survives_crashing_silent_and_poisoned_clients(tmp_path, caplog):
    config = {**RUN, "output-dir": str(tmp_path), "round-timeout": 1.0}  # the silent node's wait
    faults = {
        (100, MessageType.TRAIN, 1): "crash",
        (101, MessageType.TRAIN, 1): "nan",
        (102, MessageType.EVALUATE, 0): "silent",
        (101, PERSONALIZE, 4): "crash",  # personal rounds personalize and evaluate in one message
    }
    with caplog.at_level("WARNING", logger="flwr"):
        run_server(config, FaultyGrid(config, faults))
    results = json.loads((only_run_dir(tmp_path) / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in [results["final"]["gm"]["all"]])
    assert results["rounds"][0]["train"]["clients"] == 3  # sent to all three ...
    assert results["zero_shot"]["pm"]["num_clients"] == 2  # the silent client is left out
    assert results["rounds"][3]["pm"]["num_clients"] == 2  # the crashed one too
    assert results["rounds"][4]["pm"]["num_clients"] == 3  # and back in the next round
    assert "node 100" in caplog.text and "node 101" in caplog.text and "NaN" in caplog.text
    assert "no reply from node(s) [102]" in caplog.text


def test_a_round_where_every_update_is_bad_stops_with_one_message(tmp_path):
    config = {**RUN, "output-dir": str(tmp_path)}
    faults = {(100 + i, MessageType.TRAIN, 1): "nan" for i in range(3)}
    with pytest.raises(RuntimeError, match="round 1: only 0 valid client update"):
        run_server(config, FaultyGrid(config, faults))
    state = json.loads((only_run_dir(tmp_path) / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["round"], state["phase"]) == (0, 0, "zero-shot"), (
        "no checkpoint of a round that did not complete (only of the zero-shot step before it)"
    )


def test_every_client_stopping_on_its_own_user_error_ends_the_run_with_its_message(tmp_path):
    config = {**RUN, "output-dir": str(tmp_path)}
    faults = {(100 + i, MessageType.EVALUATE, 0): "user-error" for i in range(3)}
    with pytest.raises(
        ClientError,
        match="every client that replied stopped on an error of its own: NodeDataError: data-dir '/x' is empty",
    ):
        run_server(config, FaultyGrid(config, faults))


def test_one_client_stopping_on_a_user_error_is_left_out(tmp_path, caplog):
    config = {**RUN, "output-dir": str(tmp_path)}
    faults = {(101, MessageType.EVALUATE, 0): "user-error"}
    with caplog.at_level("WARNING", logger="flwr"):
        run_server(config, FaultyGrid(config, faults))
    results = json.loads((only_run_dir(tmp_path) / "results.json").read_text())
    assert results["zero_shot"]["pm"]["num_clients"] == 2
    assert "node 101 replied with an error: NodeDataError" in caplog.text


# ----------------------------------------------------------------- fuzzed Stage-1 replies
from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedpurel_app.protocol import EvaluateReply, Instruction  # noqa: E402
from server_app.strategy import FedPuReLStrategy, metrics_of  # noqa: E402

ARRAYS = st.one_of(
    st.just({"ctx": ((2, 3), torch.float32, 1.0)}),
    st.dictionaries(
        st.sampled_from(["ctx", "phi_k.ctx", "other"]),
        st.tuples(
            st.sampled_from([(2, 3), (3, 2), (6,), ()]),
            st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
            st.sampled_from([0.0, 1.0, -1e30, float("nan"), float("inf")]),
        ),
        max_size=3,
    ),
)
COUNTS = st.one_of(
    st.none(),
    st.integers(-5, 10**13),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, 0.5, 1000.0]),
    st.just([1, 2]),
)
PARTITIONS = st.one_of(st.just(0), st.none(), st.integers(-2, 5), st.sampled_from([0.5, float("nan"), [0]]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=ARRAYS, count=COUNTS, n_records=st.sampled_from([1, 1, 0, 2]), partition=PARTITIONS)
def test_any_stage1_reply_is_either_a_clean_update_or_dropped_with_a_reason(arrays, count, n_records, partition):
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = Message(
        RecordDict(
            {"arrays": ArrayRecord({"ctx": torch.zeros(2, 3)}), "config": ConfigRecord(Instruction(1).to_config())}
        ),
        dst_node_id=5,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict()
    for i in range(n_records):
        content[f"arrays{i}"] = ArrayRecord(
            {k: torch.full(shape, value).to(dtype) for k, (shape, dtype, value) in arrays.items()}
        )
    values = {"num-examples": count, "partition-id": partition}
    content["metrics"] = MetricRecord({k: v for k, v in values.items() if v is not None})
    reply = Message(content, reply_to=request)
    problem = strategy.reply_problem(reply)
    if problem is None:
        aggregated, _ = strategy.aggregate_train(1, [reply])
        assert torch.isfinite(torch.from_numpy(aggregated["ctx"].numpy())).all()
    else:
        assert isinstance(problem, str) and problem


def test_the_fuzzed_reply_space_holds_clean_updates():
    """The fuzz above reaches its clean branch: a well-formed reply has no problem."""
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = Message(
        RecordDict({"config": ConfigRecord(Instruction(1).to_config())}), dst_node_id=5, message_type=MessageType.TRAIN
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({"ctx": torch.ones(2, 3)}),
            "metrics": MetricRecord({"num-examples": 10, "partition-id": 0}),
        }
    )
    assert strategy.reply_problem(Message(content, reply_to=request)) is None


# ----------------------------------------------------------------- malformed evaluation replies
CLASSES = 20


def _evaluation_reply(node: int = 9, **changes) -> Message:
    request = Message(
        RecordDict({"config": ConfigRecord(Instruction(1).to_config())}),
        dst_node_id=node,
        message_type=MessageType.EVALUATE,
    )
    total = [1, 1] + [0] * (CLASSES - 2)
    good = {
        "num-examples": 2,
        "partition-id": 0,
        "restored": 0,
        "personalized": 1,
        "pm-correct": [1, 1] + [0] * (CLASSES - 2),
        "gm-correct": [0, 1] + [0] * (CLASSES - 2),
        "zs-correct": [1, 0] + [0] * (CLASSES - 2),
        "class-total": total,
    }
    good.update(changes)
    return Message(
        RecordDict({"metrics": MetricRecord({k: v for k, v in good.items() if v is not None})}), reply_to=request
    )


BAD_EVALUATIONS = {
    "missing class totals": {"class-total": None},
    "wrong number of classes": {"pm-correct": [0] * (CLASSES + 1)},
    "more correct than samples": {"gm-correct": [2] + [0] * (CLASSES - 1)},
    "negative count": {"zs-correct": [-1] + [0] * (CLASSES - 1)},
    "float counts": {"pm-correct": [0.5] + [0.0] * (CLASSES - 1)},
    "personalized not 0/1": {"personalized": 7},
    "num-examples not the sum of the class totals": {"num-examples": 3},
    "per-sample predictions": {"pm-preds": [0, 1]},
    "missing partition": {"partition-id": None},
}


@pytest.mark.parametrize("case", sorted(BAD_EVALUATIONS))
def test_a_malformed_evaluation_reply_is_dropped_and_logged(case, caplog):
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, num_classes=CLASSES)
    good, bad = _evaluation_reply(), _evaluation_reply(node=13, **BAD_EVALUATIONS[case])
    read = lambda m: EvaluateReply.read(metrics_of(m), CLASSES)  # noqa: E731
    with caplog.at_level("WARNING", logger="flwr"):
        kept = strategy.read_replies("round 1 evaluation", [good, bad], read)
    assert [msg for msg, _ in kept] == [good]
    assert "round 1 evaluation: dropped the reply of node 13" in caplog.text
