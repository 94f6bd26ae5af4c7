"""Client faults during a whole run, through the real server round loop (no Flower processes).

The fake grid of tests/test_resume.py delivers messages to the ClientApp
handlers; here some nodes crash (an error reply, as Flower sends when a
ClientApp raises), never answer (a timeout: no reply), or send a poisoned
update. The run must complete on the remaining clients, log what it dropped,
and stop with one clear error when no valid update is left in a round.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType

from server_app.strategy import PERSONALIZE
from tests.test_resume import RUN, DirectGrid, only_run_dir, run_server, task_identity  # noqa: F401


class FaultyGrid(DirectGrid):
    def __init__(self, run_config, faults):
        super().__init__(run_config)
        self.faults = faults  # (node, message type, round) -> "crash" | "silent" | "nan"

    def reply(self, msg: Message, server_round: int) -> Message | None:
        """A "silent" node never replies (the server waits until round-timeout)."""
        fault = self.faults.get((msg.metadata.dst_node_id, msg.metadata.message_type, server_round))
        if fault == "silent":
            return None
        if fault == "crash":
            return Message(Error(code=0, reason="ClientApp raised RuntimeError"), reply_to=msg)
        reply = super().reply(msg, server_round)
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
    assert results["zero_shot"]["pm"]["num_clients"] == 2       # the silent client is left out
    assert results["rounds"][3]["pm"]["num_clients"] == 2       # the crashed one too
    assert "node 100" in caplog.text and "node 101" in caplog.text and "NaN" in caplog.text


def test_a_round_where_every_update_is_bad_stops_with_one_message(tmp_path):
    config = {**RUN, "output-dir": str(tmp_path)}
    faults = {(100 + i, MessageType.TRAIN, 1): "nan" for i in range(3)}
    with pytest.raises(RuntimeError, match="round 1: only 0 valid client update"):
        run_server(config, FaultyGrid(config, faults))
    state = only_run_dir(tmp_path) / "checkpoint"
    assert not state.exists(), "no checkpoint of a round that did not complete"


# ----------------------------------------------------------------- fuzzed Stage-1 replies
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from server_app.strategy import FedPuReLStrategy  # noqa: E402

ARRAYS = st.one_of(st.just({"ctx": ((2, 3), torch.float32, 1.0)}), st.dictionaries(
    st.sampled_from(["ctx", "phi_k.ctx", "other"]),
    st.tuples(
        st.sampled_from([(2, 3), (3, 2), (6,), ()]),
        st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
        st.sampled_from([0.0, 1.0, -1e30, float("nan"), float("inf")]),
    ),
    max_size=3,
))
COUNTS = st.one_of(
    st.none(), st.integers(-5, 10**13), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, 0.5, 1000.0]), st.just([1, 2]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=ARRAYS, count=COUNTS, n_records=st.sampled_from([1, 1, 0, 2]))
def test_any_stage1_reply_is_either_a_clean_update_or_dropped_with_a_reason(arrays, count, n_records):
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = Message(RecordDict({"arrays": ArrayRecord({"ctx": torch.zeros(2, 3)}),
                                  "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=5, message_type=MessageType.TRAIN)
    content = RecordDict()
    for i in range(n_records):
        content[f"arrays{i}"] = ArrayRecord({k: torch.full(shape, value).to(dtype) for k, (shape, dtype, value) in arrays.items()})
    if count is not None:
        content["metrics"] = MetricRecord({"num-examples": count})
    reply = Message(content, reply_to=request)
    problem = strategy.reply_problem(reply)
    if problem is None:
        aggregated, _ = strategy.aggregate_train(1, [reply])
        assert torch.isfinite(torch.from_numpy(aggregated["ctx"].numpy())).all()
    else:
        assert isinstance(problem, str) and problem


# ----------------------------------------------------------------- malformed evaluation replies
def _evaluation_reply(**metrics) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=9,
                      message_type=MessageType.EVALUATE)
    good = {"num-examples": 2, "personalized": 1, "labels": [0, 1], "pm-preds": [0, 1], "gm-preds": [1, 1],
            "zs-preds": [0, 0]}
    good.update(metrics)
    return Message(RecordDict({"metrics": MetricRecord({k: v for k, v in good.items() if v is not None})}),
                   reply_to=request)


BAD_EVALUATIONS = {
    "missing labels": {"labels": None},
    "length mismatch": {"pm-preds": [0, 1, 1]},
    "class out of range": {"gm-preds": [0, 20]},
    "negative class": {"zs-preds": [-1, 0]},
    "float predictions": {"pm-preds": [0.5, 1.0]},
    "personalized not 0/1": {"personalized": 7},
}


@pytest.mark.parametrize("case", sorted(BAD_EVALUATIONS))
def test_a_malformed_evaluation_reply_is_dropped_and_logged(case, caplog):
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, num_classes=20)
    good, bad = _evaluation_reply(), _evaluation_reply(**BAD_EVALUATIONS[case])
    assert strategy.evaluate_problem(good) is None and strategy.evaluate_problem(bad) is not None
    with caplog.at_level("WARNING", logger="flwr"):
        kept = strategy.evaluate_replies([good, bad])
    assert len(kept) == 1 and "Dropped the evaluation reply" in caplog.text
