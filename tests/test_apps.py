"""The Flower apps without a network: what a ClientApp replies, what the strategy aggregates."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from client_app import app as client
from fedpurel_app import task
from fedpurel_app.config import parse_run_config
from server_app.strategy import PERSONALIZE, FedPuReLStrategy
from tests.conftest import SMALL_RUN


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are built outside a Flower process here: give them the identity one would have."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def make_context(partition_id: int = 0, num_partitions: int = 4) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=dict(SMALL_RUN),
    )


def server_message(phi_g: dict, message_type: str, server_round: int = 1) -> Message:
    content = RecordDict({"arrays": ArrayRecord(phi_g), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=100, message_type=message_type)


def all_tensors(message: Message) -> list[np.ndarray]:
    return [array.numpy() for record in message.content.array_records.values() for array in record.values()]


@pytest.fixture(scope="module")
def phi_g(small_cfg):
    return task.build_model(small_cfg).global_state()


def test_no_reply_ever_carries_phi_k(phi_g):
    """Run personalize -> train -> evaluate on one node and inspect every reply."""
    context = make_context()
    replies = [client.personalize(server_message(phi_g, PERSONALIZE), context)]
    phi_k = context.state.array_records[client.PHI_K].to_torch_state_dict()["ctx"].numpy()
    assert not np.array_equal(phi_k, phi_g["ctx"].numpy()), "Stage 2 did not change phi_k"
    replies.append(client.train(server_message(phi_g, MessageType.TRAIN, 2), context))
    replies.append(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 2), context))

    personalize_reply, train_reply, evaluate_reply = replies
    assert all_tensors(personalize_reply) == [] and all_tensors(evaluate_reply) == []
    (record,) = train_reply.content.array_records.values()
    assert list(record.keys()) == ["ctx"]
    for reply in replies:
        for tensor in all_tensors(reply):
            assert not np.allclose(tensor, phi_k), "a reply carries phi_k"
        for metrics in reply.content.metric_records.values():
            for value in metrics.values():
                flat = np.asarray(value, dtype=float).ravel()
                assert flat.size != phi_k.size or not np.allclose(flat, phi_k.ravel())
    # The personalized prediction uses phi_k: evaluate says so.
    metrics = next(iter(evaluate_reply.content.metric_records.values()))
    assert metrics["personalized"] == 1
    assert len(metrics["pm-preds"]) == len(metrics["labels"]) == metrics["num-examples"]


def test_features_are_computed_once_per_node(phi_g, monkeypatch):
    context = make_context(1)
    client.train(server_message(phi_g, MessageType.TRAIN, 1), context)
    calls = []
    monkeypatch.setattr(task, "client_feature_sets", lambda *a: calls.append(a))
    client.train(server_message(phi_g, MessageType.TRAIN, 2), context)
    assert calls == [], "features were recomputed although cached in context.state"


def test_missing_partition_in_node_config_is_a_clear_error(phi_g):
    context = make_context()
    context.node_config.clear()
    with pytest.raises(ValueError, match="partition-id"):
        client.train(server_message(phi_g, MessageType.TRAIN), context)


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def reply(phi: dict, n, src: int, request: Message) -> Message:
    """Node ``src``'s reply to a Stage-1 request."""
    request = Message(request.content, dst_node_id=src, message_type=request.metadata.message_type)
    metrics = MetricRecord({"num-examples": n, "conflict-rate": 0.5})
    return Message(RecordDict({"arrays": ArrayRecord(phi), "metrics": metrics}), reply_to=request)


GOOD = {"ctx": torch.ones(2, 3)}
BAD_REPLIES = {
    "extra array (a phi_k tensor)": ({"ctx": torch.ones(2, 3), "phi_k.ctx": torch.ones(2, 3)}, 10),
    "missing array": ({"other": torch.ones(2, 3)}, 10),
    "wrong shape": ({"ctx": torch.ones(3, 3)}, 10),
    "wrong dtype": ({"ctx": torch.ones(2, 3, dtype=torch.float64)}, 10),
    "NaN": ({"ctx": torch.full((2, 3), float("nan"))}, 10),
    "Inf": ({"ctx": torch.full((2, 3), float("inf"))}, 10),
    "zero examples": (GOOD, 0),
    "negative examples": (GOOD, -5),
    "fractional examples": (GOOD, 2.5),
    "absurd examples": (GOOD, 10**12),
    "Inf examples": (GOOD, float("inf")),
    "NaN examples": (GOOD, float("nan")),
}


def test_aggregation_is_weighted_by_n_k():
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
    replies = [reply({"ctx": torch.ones(2, 3)}, 10, 1, request), reply({"ctx": 4 * torch.ones(2, 3)}, 30, 2, request)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full((2, 3), (10 * 1 + 30 * 4) / 40))
    assert metrics["conflict-rate"] == pytest.approx(0.5)


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_bad_reply_is_dropped_logged_and_the_round_goes_on(case, caplog):
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
    phi, n = BAD_REPLIES[case]
    bad = reply(phi, n, 777, request)
    assert strategy.reply_problem(bad) is not None
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, _ = strategy.aggregate_train(3, [reply(GOOD, 10, 1, request), bad])
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.ones((2, 3)))
    assert "node 777" in caplog.text


def test_a_round_without_enough_valid_replies_fails_clearly():
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000, min_valid_replies=2)
    request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
    with pytest.raises(RuntimeError, match="only 1 valid client update"):
        strategy.aggregate_train(4, [reply(GOOD, 10, 1, request), reply(*BAD_REPLIES["NaN"], 2, request)])


def test_sampling_is_seeded_all_first_round_then_a_fraction():
    grid = FakeGrid(range(10, 30))
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, fraction_train=0.4, seed=7)
    assert strategy.sample(1, grid) == sorted(grid.node_ids)
    second = strategy.sample(2, grid)
    assert len(second) == 8 and set(second) <= set(grid.node_ids)
    assert second == FedPuReLStrategy({"ctx": (2, 3)}, fraction_train=0.4, seed=7).sample(2, grid)
    assert second != strategy.sample(3, grid)
    large = FakeGrid([2**64 - 1 - i for i in range(5)])  # node ids beyond int64 survive sampling
    assert set(strategy.sample(2, large)) <= set(large.node_ids)


def test_personalization_and_evaluation_messages_go_to_every_node():
    grid = FakeGrid([5, 6, 7])
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, min_available_nodes=1)
    arrays = ArrayRecord({"ctx": torch.zeros(2, 3)})
    personalize = strategy.configure_personalize(3, arrays, grid)
    assert [m.metadata.dst_node_id for m in personalize] == [5, 6, 7]
    assert {m.metadata.message_type for m in personalize} == {PERSONALIZE}
    evaluate = list(strategy.configure_evaluate(3, arrays, ConfigRecord(), grid))
    assert {m.metadata.message_type for m in evaluate} == {MessageType.EVALUATE}


def test_phi_k_survives_a_node_restart_through_its_state_dir(phi_g, tmp_path):
    node_config = {"partition-id": 2, "num-partitions": 4, "state-dir": str(tmp_path / "state")}
    first = make_context(2)
    first.node_config.update(node_config)
    client.personalize(server_message(phi_g, PERSONALIZE), first)
    saved = first.state.array_records[client.PHI_K].to_torch_state_dict()["ctx"]
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700

    restarted = make_context(2)  # a fresh process: empty context.state, same state-dir
    restarted.node_config.update(node_config)
    reply = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 5), restarted)
    assert next(iter(reply.content.metric_records.values()))["personalized"] == 1
    assert torch.equal(restarted.state.array_records[client.PHI_K].to_torch_state_dict()["ctx"], saved)

    other_run = make_context(2)  # another config (seed): the saved phi_k is not loaded
    other_run.node_config.update(node_config)
    other_run.run_config["seed"] = 7
    reply = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 1), other_run)
    assert next(iter(reply.content.metric_records.values()))["personalized"] == 0


@pytest.mark.parametrize(
    ("node_config", "expected"),
    [
        ({}, "missing key 'partition-id'"),
        ({"partition-id": 4, "num-partitions": 4}, "partition-id (4) must be smaller than num-partitions (4)"),
        ({"partition-id": -1, "num-partitions": 4}, "key 'partition-id'"),
        ({"partition-id": 0, "num-partitions": 4, "state-dri": "/tmp/x"}, "unknown key 'state-dri' (did you mean 'state-dir'?)"),
    ],
)
def test_a_bad_node_config_is_one_clear_error(phi_g, node_config, expected):
    from fedpurel_app.config import ConfigError

    context = make_context()
    context.node_config.clear()
    context.node_config.update(node_config)
    with pytest.raises(ConfigError) as err:
        client.train(server_message(phi_g, MessageType.TRAIN), context)
    assert expected in str(err.value) and "--node-config" in str(err.value)


@pytest.mark.parametrize("name", ["promptfl-la", "fed-grab", "promptfolio", "pft", "lp-ft", "fedpurel-kl"])
def test_every_method_runs_through_the_client_app_and_keeps_its_private_state(phi_g, name):
    """train (with the class counts when the method needs them), personalize, evaluate."""
    from fedpurel_app.methods import METHODS

    method = METHODS[name]
    context = make_context()
    context.run_config = {**SMALL_RUN, "method": name}
    msg = server_message(phi_g, MessageType.TRAIN)
    if method.needs_prior:
        counts = [int(c) for c in task.class_counts(parse_run_config(context.run_config))]
        msg.content["config"]["class-counts"] = counts
    reply = client.train(msg, context)
    (record,) = reply.content.array_records.values()
    assert list(record.keys()) == ["ctx"], "a train reply carries phi_g only"
    if method.personal_phase:
        client.personalize(server_message(phi_g, PERSONALIZE, 2), context)
    evaluation = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 2), context).content["metrics"]
    has_private = method.personal_phase or method.stage1_trains_private
    assert bool(evaluation["personalized"]) == has_private
    assert (client.PHI_K in context.state.array_records) == has_private
    assert (client.METHOD_STATE in context.state.array_records) == (name in ("fed-grab", "lp-ft"))


class PollingGrid:
    """Replies arrive one pull after another; counts pulls."""

    def __init__(self, replies_per_pull: list[list[str]]):
        self.batches = replies_per_pull
        self.pulls = 0

    def push_messages(self, messages):
        return [m for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        batch = self.batches.pop(0) if self.batches else []
        return [type("Reply", (), {"metadata": type("M", (), {"reply_to_message_id": i})()})() for i in batch]


def test_exchange_polls_quickly_and_stops_when_every_reply_arrived():
    import time

    from server_app.exchange import send_and_receive

    grid = PollingGrid([["a"], [], ["b", "c"]])
    t0 = time.monotonic()
    replies = send_and_receive(grid, ["a", "b", "c"], timeout=30, pull_interval=0.01)
    assert len(replies) == 3 and grid.pulls == 3 and time.monotonic() - t0 < 1.0


def test_exchange_gives_up_after_the_timeout_with_what_arrived():
    import time

    from server_app.exchange import send_and_receive

    grid = PollingGrid([["a"]])
    t0 = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout=0.2, pull_interval=0.01)
    assert len(replies) == 1 and grid.pulls > 3
    assert time.monotonic() - t0 < 0.4  # the backed-off wait stops at the timeout


def test_exchange_backs_off_after_a_quiet_second_and_not_past_the_cap(monkeypatch):
    from server_app import exchange

    clock = [0.0]
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(exchange.time, "sleep", sleep)
    monkeypatch.setattr(exchange.time, "monotonic", lambda: clock[0])
    grid = PollingGrid([[]] * 120 + [["a"], [], ["b"]])
    replies = exchange.send_and_receive(grid, ["a", "b"], timeout=3600, pull_interval=0.01, max_pull_interval=0.1)
    assert len(replies) == 2
    n_fast = next(i for i, w in enumerate(waits) if w != pytest.approx(0.01))
    assert n_fast >= 99  # every 10 ms for the first quiet second
    grown = waits[n_fast:]
    assert grown[0] == pytest.approx(0.015) and grown[1] == pytest.approx(0.0225)  # then 1.5x per empty pull
    assert max(waits) == pytest.approx(0.1)  # capped
    assert waits[120] == pytest.approx(0.01)  # back to 10 ms once a reply arrived


def test_aggregation_does_not_depend_on_the_order_replies_arrive_in():
    strategy = FedPuReLStrategy({"ctx": (4, 8)}, max_examples=10**6)
    request = server_message({"ctx": torch.zeros(4, 8)}, MessageType.TRAIN)
    g = torch.Generator().manual_seed(0)
    replies = [reply({"ctx": torch.randn(4, 8, generator=g)}, int(n), node, request)
               for node, n in zip(range(1, 8), torch.randint(1, 1000, (7,), generator=g))]
    first, _ = strategy.aggregate_train(1, replies)
    second, _ = strategy.aggregate_train(1, replies[::-1])
    assert np.array_equal(first["ctx"].numpy(), second["ctx"].numpy())


def test_sampling_follows_the_partitions_nodes_report_not_their_random_ids():
    """Simulation gives nodes random ids each run: the same seed must sample the same partitions."""

    def sampled_partitions(node_ids):
        strategy = FedPuReLStrategy({"ctx": (2, 3)}, fraction_train=0.4, seed=3)
        request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
        replies = []
        for pid, node in enumerate(node_ids):
            msg = reply({"ctx": torch.ones(2, 3)}, 10, node, request)
            msg.content["metrics"]["partition-id"] = pid
            replies.append(msg)
        strategy.note_partitions(replies)
        grid = type("G", (), {"get_node_ids": lambda self: list(node_ids)})()
        by_node = {node: pid for pid, node in enumerate(node_ids)}
        return sorted(by_node[n] for n in strategy.sample(2, grid))

    rng = np.random.default_rng(0)
    runs = [sampled_partitions([int(x) for x in rng.choice(10**9, 10, replace=False)]) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 4


def test_a_restarted_node_restores_a_methods_private_state_from_its_state_dir(phi_g, tmp_path):
    """LP-FT's head (method state) and copy (phi_k) survive a restart through the state-dir."""
    def node():
        context = make_context()
        context.run_config = {**SMALL_RUN, "method": "lp-ft"}
        context.node_config = {**context.node_config, "state-dir": str(tmp_path / "state")}
        return context

    before = node()
    client.personalize(server_message(phi_g, PERSONALIZE, 3), before)
    expected = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 3), before).content["metrics"]
    after = node()  # a fresh process: empty context.state
    got = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 3), after).content["metrics"]
    head = after.state.array_records[client.METHOD_STATE].to_torch_state_dict()["head"]
    assert torch.equal(head, before.state.array_records[client.METHOD_STATE].to_torch_state_dict()["head"])
    assert list(got["pm-preds"]) == list(expected["pm-preds"]) and got["personalized"] == 1


def test_the_partition_id_is_not_averaged_into_the_round_metrics():
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
    replies = [reply({"ctx": torch.ones(2, 3)}, 10, node, request) for node in (1, 2)]
    for pid, msg in enumerate(replies):
        msg.content["metrics"]["partition-id"] = pid
    _, metrics = strategy.aggregate_train(1, replies)
    assert "partition-id" not in metrics and metrics["conflict-rate"] == pytest.approx(0.5)
    assert strategy.partitions == {1: 0, 2: 1}


def test_personalize_with_evaluate_replies_what_a_separate_evaluation_would(phi_g, small_cfg):
    """One message per client in the personal phase: personalize, then evaluate, in one ClientApp call."""
    merged, separate = make_context(1), make_context(1)
    ask = server_message(phi_g, PERSONALIZE, 3)
    ask.content["config"]["evaluate"] = 1
    merged_reply = client.personalize(ask, merged)
    plain_reply = client.personalize(server_message(phi_g, PERSONALIZE, 3), separate)
    evaluate_reply = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 3), separate)

    assert all_tensors(merged_reply) == []
    (got,) = merged_reply.content.metric_records.values()
    (want,) = evaluate_reply.content.metric_records.values()
    (plain,) = plain_reply.content.metric_records.values()
    assert "labels" not in plain, "without evaluate a personalize reply carries no predictions"
    assert got["residual-loss"] == plain["residual-loss"]
    for key in want:
        assert got[key] == want[key], key
    assert got["personalized"] == 1

    strategy = FedPuReLStrategy({"ctx": tuple(phi_g["ctx"].shape)}, num_classes=len(task.class_counts(small_cfg)))
    assert strategy.evaluate_replies([merged_reply]) == [got]
    messages = strategy.configure_personalize(3, ArrayRecord(phi_g), FakeGrid([5, 6]), evaluate=True)
    assert [m.content["config"]["evaluate"] for m in messages] == [1, 1]
    assert all("evaluate" not in m.content["config"]
               for m in strategy.configure_personalize(3, ArrayRecord(phi_g), FakeGrid([5, 6])))
