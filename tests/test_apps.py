"""The Flower apps without a network: what a ClientApp replies, what the strategy aggregates."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from client_app import app as client
from fedpurel_app import protocol
from fedpurel_app.client import METHOD_STATE, PHI_K
from fedpurel_app.data.client import class_counts, global_test
from fedpurel_app.inputs import clip_of
from fedpurel_app.peft.base import build_peft
from fedpurel_app.protocol import PERSONALIZE, EvaluateReply, Instruction, PersonalizeReply
from fedpurel_app.registry import METHODS
from server_app.strategy import FedPuReLStrategy, metrics_of
from tests.conftest import SMALL_RUN, make_cfg

# Where the ClientApp keeps a node's private tensors in its context.state.
PHI_K_RECORD = client.ContextMemory.PREFIX + PHI_K
METHOD_STATE_RECORD = client.ContextMemory.PREFIX + METHOD_STATE


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


def server_message(phi_g: dict, message_type: str, server_round: int = 1, **instruction) -> Message:
    config = Instruction(server_round, **instruction).to_config()
    content = RecordDict({protocol.ARRAYS: ArrayRecord(phi_g), protocol.CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=100, message_type=message_type)


def all_tensors(message: Message) -> list[np.ndarray]:
    return [array.numpy() for record in message.content.array_records.values() for array in record.values()]


def metrics(message: Message) -> dict:
    (record,) = message.content.metric_records.values()
    return dict(record)


def private(context: Context, name: str = PHI_K_RECORD) -> dict[str, torch.Tensor]:
    return context.state.array_records[name].to_torch_state_dict()


def num_classes(cfg) -> int:
    return len(class_counts(cfg.data, cfg.seed))


@pytest.fixture(scope="module")
def phi_g(small_cfg):
    data = global_test(small_cfg.data)
    clip = clip_of(small_cfg.model, small_cfg.data)
    return build_peft(small_cfg, clip, data.classnames, data.template).global_state()


def test_no_reply_ever_carries_phi_k(phi_g, small_cfg):
    """Run personalize -> train -> evaluate on one node and inspect every reply."""
    context = make_context()
    replies = [client.personalize(server_message(phi_g, PERSONALIZE), context)]
    phi_k = private(context)["ctx"].numpy()
    assert not np.array_equal(phi_k, phi_g["ctx"].numpy()), "Stage 2 did not change phi_k"
    replies.append(client.train(server_message(phi_g, MessageType.TRAIN, 2), context))
    replies.append(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 2), context))

    personalize_reply, train_reply, evaluate_reply = replies
    assert not any(r.has_error() for r in replies)
    assert all_tensors(personalize_reply) == [] and all_tensors(evaluate_reply) == []
    (record,) = train_reply.content.array_records.values()
    assert list(record.keys()) == ["ctx"]
    for reply in replies:
        for tensor in all_tensors(reply):
            assert not np.allclose(tensor, phi_k), "a reply carries phi_k"
        for values in reply.content.metric_records.values():
            for value in values.values():
                flat = np.asarray(value, dtype=float).ravel()
                assert flat.size != phi_k.size or not np.allclose(flat, phi_k.ravel())
    # The personalized prediction uses phi_k: evaluate says so, in per-class counts only.
    got = metrics(evaluate_reply)
    assert got["personalized"] == 1
    assert sum(got["class-total"]) == got["num-examples"] > 0
    for key in protocol.Evaluation.KEYS:
        assert len(got[key]) == num_classes(small_cfg) != got["num-examples"], "per-sample data in a reply"
    assert "labels" not in got and "pm-preds" not in got
    assert EvaluateReply.read(got, num_classes(small_cfg)).evaluation.personalized


def test_features_are_computed_once_per_node(phi_g, monkeypatch):
    from fedpurel_app import client as library_client

    context = make_context(1)
    assert not client.train(server_message(phi_g, MessageType.TRAIN, 1), context).has_error()
    calls = []
    monkeypatch.setattr(library_client, "client_feature_sets", lambda *a: calls.append(a))
    reply = client.train(server_message(phi_g, MessageType.TRAIN, 2), context)
    assert not reply.has_error()
    assert calls == [], "features were recomputed although cached in context.state"


def user_error(reply: Message) -> str:
    """The reason of a ClientApp's user-error reply."""
    assert reply.has_error(), "expected an error reply"
    assert reply.error.code == protocol.USER_ERROR
    return reply.error.reason


def test_missing_partition_in_node_config_is_a_clear_error(phi_g):
    context = make_context()
    context.node_config.clear()
    assert "partition-id" in user_error(client.train(server_message(phi_g, MessageType.TRAIN), context))


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def reply(phi: dict, n, src: int, request: Message, partition_id: int = 0) -> Message:
    """Node ``src``'s reply to a Stage-1 request."""
    request = Message(request.content, dst_node_id=src, message_type=request.metadata.message_type)
    values = MetricRecord({"num-examples": n, "partition-id": partition_id, "conflict-rate": 0.5})
    return Message(RecordDict({"arrays": ArrayRecord(phi), "metrics": values}), reply_to=request)


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
    replies = [
        reply({"ctx": torch.ones(2, 3)}, 10, 1, request, 0),
        reply({"ctx": 4 * torch.ones(2, 3)}, 30, 2, request, 1),
    ]
    arrays, values = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full((2, 3), (10 * 1 + 30 * 4) / 40))
    assert values["conflict-rate"] == pytest.approx(0.5)


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_bad_reply_is_dropped_logged_and_the_round_goes_on(case, caplog):
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
    phi, n = BAD_REPLIES[case]
    bad = reply(phi, n, 777, request, 1)
    assert strategy.reply_problem(bad) is not None
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, _ = strategy.aggregate_train(3, [reply(GOOD, 10, 1, request), bad])
    np.testing.assert_allclose(arrays["ctx"].numpy(), np.ones((2, 3)))
    assert "node 777" in caplog.text


def test_a_round_without_enough_valid_replies_fails_clearly():
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000, min_valid_replies=2)
    request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
    with pytest.raises(RuntimeError, match="only 1 valid client update"):
        strategy.aggregate_train(4, [reply(GOOD, 10, 1, request), reply(*BAD_REPLIES["NaN"], 2, request, 1)])


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
    personalize = strategy.configure_personalize(arrays, Instruction(3), grid)
    assert [m.metadata.dst_node_id for m in personalize] == [5, 6, 7]
    assert {m.metadata.message_type for m in personalize} == {PERSONALIZE}
    assert all(m.content[protocol.CONFIG]["server-round"] == 3 for m in personalize)
    sampled = strategy.configure_personalize(arrays, Instruction(3), grid, [6])
    assert [m.metadata.dst_node_id for m in sampled] == [6]
    evaluate = list(strategy.configure_evaluate(3, arrays, Instruction(3), grid))
    assert [m.metadata.dst_node_id for m in evaluate] == [5, 6, 7]
    assert {m.metadata.message_type for m in evaluate} == {MessageType.EVALUATE}
    query = strategy.configure_query(Instruction(0), grid)
    assert [m.metadata.dst_node_id for m in query] == [5, 6, 7]
    assert {m.metadata.message_type for m in query} == {protocol.QUERY}
    assert all(not m.content.array_records for m in query), "a query carries no parameters"


def test_a_query_reports_the_partition_and_reads_no_data(monkeypatch):
    from fedpurel_app import client as library_client

    monkeypatch.setattr(library_client, "client_data", lambda *a: pytest.fail("a query read data"))
    context = make_context(3)
    msg = Message(
        RecordDict({protocol.CONFIG: ConfigRecord(Instruction(0).to_config())}),
        dst_node_id=103,
        message_type=protocol.QUERY,
    )
    answer = client.query(msg, context)
    assert not answer.has_error() and metrics(answer) == {"partition-id": 3}
    strategy = FedPuReLStrategy({"ctx": (2, 3)})
    (identity,) = strategy.identities([answer])
    assert identity.partition_id == 3


def test_phi_k_survives_a_node_restart_through_its_state_dir(phi_g, tmp_path):
    node_config = {"partition-id": 2, "num-partitions": 4, "state-dir": str(tmp_path / "state")}
    first = make_context(2)
    first.node_config.update(node_config)
    assert metrics(client.personalize(server_message(phi_g, PERSONALIZE), first))["restored"] == 0
    saved = private(first)["ctx"]
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700

    restarted = make_context(2)  # a fresh process: empty context.state, same state-dir
    restarted.node_config.update(node_config)
    got = metrics(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 5), restarted))
    assert got["personalized"] == 1 and got["restored"] == 1
    assert torch.equal(private(restarted)["ctx"], saved)

    other_run = make_context(2)  # another config (seed): the saved phi_k is not loaded
    other_run.node_config.update(node_config)
    other_run.run_config["seed"] = 7
    got = metrics(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 1), other_run))
    assert got["personalized"] == 0 and got["restored"] == 0


def test_a_node_without_state_dir_keeps_its_phi_k_in_a_folder_of_the_run(phi_g, tmp_path):
    """Simulation: no state-dir; the run named in the instruction gives the node a folder in the cache."""
    run_config = {**SMALL_RUN, "model.cache-dir": str(tmp_path / "cache")}
    first = make_context(1)
    first.run_config = dict(run_config)
    client.personalize(server_message(phi_g, PERSONALIZE, 2, run="run-a"), first)
    folder = tmp_path / "cache" / "nodes" / "run-a" / "partition-1-of-4"
    assert (folder / "phi_k.safetensors").is_file()
    again = make_context(1)  # a restarted simulation: empty context.state, same run
    again.run_config = dict(run_config)
    got = metrics(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 3, run="run-a"), again))
    assert got["personalized"] == 1 and got["restored"] == 1
    other = make_context(1)  # another run does not see it
    other.run_config = dict(run_config)
    got = metrics(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 3, run="run-b"), other))
    assert got["personalized"] == 0 and got["restored"] == 0


@pytest.mark.parametrize(
    ("node_config", "expected"),
    [
        ({}, "missing key 'partition-id'"),
        ({"partition-id": 4, "num-partitions": 4}, "partition-id (4) must be smaller than num-partitions (4)"),
        ({"partition-id": -1, "num-partitions": 4}, "key 'partition-id'"),
        (
            {"partition-id": 0, "num-partitions": 4, "state-dri": "/tmp/x"},
            "unknown key 'state-dri' (did you mean 'state-dir'?)",
        ),
    ],
)
def test_a_bad_node_config_is_one_clear_error(phi_g, node_config, expected):
    from fedpurel_app.config import ConfigError, parse_node_config

    context = make_context()
    context.node_config.clear()
    context.node_config.update(node_config)
    with pytest.raises(ConfigError) as err:
        parse_node_config(context.node_config)
    assert expected in str(err.value) and "--node-config" in str(err.value)
    # The ClientApp replies with that one message as a user error, for every message type.
    for message_type, rnd in ((MessageType.TRAIN, 1), (PERSONALIZE, 2), (MessageType.EVALUATE, 2)):
        reason = user_error(client_handler(message_type)(server_message(phi_g, message_type, rnd), context))
        assert expected in reason and "--node-config" in reason and "Traceback" not in reason


def client_handler(message_type: str):
    return {MessageType.TRAIN: client.train, PERSONALIZE: client.personalize, MessageType.EVALUATE: client.evaluate}[
        message_type
    ]


@pytest.mark.parametrize("name", ["promptfl-la", "fed-grab", "promptfolio", "pft", "lp-ft", "fedpurel-kl"])
def test_every_method_runs_through_the_client_app_and_keeps_its_private_state(phi_g, name):
    """train (with the class counts when the method needs them), personalize, evaluate."""
    method = METHODS.get(name)
    context = make_context()
    context.run_config = {**SMALL_RUN, "method.name": name}
    cfg = make_cfg(context.run_config)
    extra = {"class_counts": tuple(int(c) for c in class_counts(cfg.data, cfg.seed))} if method.needs_prior else {}
    reply = client.train(server_message(phi_g, MessageType.TRAIN, **extra), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    (record,) = reply.content.array_records.values()
    assert list(record.keys()) == ["ctx"], "a train reply carries phi_g only"
    if method.personal_phase:
        assert not client.personalize(server_message(phi_g, PERSONALIZE, 2, **extra), context).has_error()
    evaluation = metrics(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 2, **extra), context))
    has_private = method.personal_phase or method.stage1_trains_private
    assert bool(evaluation["personalized"]) == has_private
    assert (PHI_K_RECORD in context.state.array_records) == has_private
    assert (METHOD_STATE_RECORD in context.state.array_records) == (name in ("fed-grab", "lp-ft"))


def test_a_method_that_needs_the_prior_says_so_when_a_message_lacks_it(phi_g):
    """A message without the class counts is the server's mistake, not the user's: it raises (Flower
    turns that into an error reply), naming what is missing."""
    assert METHODS.get("promptfl-la").needs_prior
    context = make_context()
    context.run_config = {**SMALL_RUN, "method.name": "promptfl-la"}
    with pytest.raises(ValueError, match="class-counts"):
        client.train(server_message(phi_g, MessageType.TRAIN), context)


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
    replies = [
        reply({"ctx": torch.randn(4, 8, generator=g)}, int(n), node, request, node - 1)
        for node, n in zip(range(1, 8), torch.randint(1, 1000, (7,), generator=g), strict=True)
    ]
    first, _ = strategy.aggregate_train(1, replies)
    second, _ = strategy.aggregate_train(1, replies[::-1])
    assert np.array_equal(first["ctx"].numpy(), second["ctx"].numpy())


def test_sampling_follows_the_partitions_nodes_report_not_their_random_ids():
    """Simulation gives nodes random ids each run: the same seed must sample the same partitions."""

    def sampled_partitions(node_ids):
        strategy = FedPuReLStrategy({"ctx": (2, 3)}, fraction_train=0.4, seed=3)
        request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
        replies = [reply({"ctx": torch.ones(2, 3)}, 10, node, request, pid) for pid, node in enumerate(node_ids)]
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
        context.run_config = {**SMALL_RUN, "method.name": "lp-ft"}
        context.node_config = {**context.node_config, "state-dir": str(tmp_path / "state")}
        return context

    before = node()
    assert not client.personalize(server_message(phi_g, PERSONALIZE, 3), before).has_error()
    expected = metrics(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 3), before))
    after = node()  # a fresh process: empty context.state
    got = metrics(client.evaluate(server_message(phi_g, MessageType.EVALUATE, 3), after))
    head = private(after, METHOD_STATE_RECORD)["head"]
    assert torch.equal(head, private(before, METHOD_STATE_RECORD)["head"])
    assert got["pm-correct"] == expected["pm-correct"] and got["personalized"] == 1 and got["restored"] == 1


def test_the_partition_id_is_not_averaged_into_the_round_metrics():
    strategy = FedPuReLStrategy({"ctx": (2, 3)}, max_examples=1000)
    request = server_message({"ctx": torch.zeros(2, 3)}, MessageType.TRAIN)
    replies = [reply({"ctx": torch.ones(2, 3)}, 10, node, request, pid) for pid, node in enumerate((1, 2))]
    _, values = strategy.aggregate_train(1, replies)
    assert "partition-id" not in values and values["conflict-rate"] == pytest.approx(0.5)
    assert strategy.partitions == {1: 0, 2: 1}


def test_personalize_with_evaluate_replies_what_a_separate_evaluation_would(phi_g, small_cfg):
    """One message per client in the personal phase: personalize, then evaluate, in one ClientApp call."""
    merged, separate = make_context(1), make_context(1)
    merged_reply = client.personalize(server_message(phi_g, PERSONALIZE, 3, evaluate=True), merged)
    plain_reply = client.personalize(server_message(phi_g, PERSONALIZE, 3), separate)
    evaluate_reply = client.evaluate(server_message(phi_g, MessageType.EVALUATE, 3), separate)

    assert all_tensors(merged_reply) == []
    got, want, plain = metrics(merged_reply), metrics(evaluate_reply), metrics(plain_reply)
    assert "pm-correct" not in plain and "class-total" not in plain, "without evaluate no evaluation is sent"
    assert got["personal-loss"] == plain["personal-loss"]
    for key in protocol.Evaluation.KEYS + ("personalized", "partition-id", "restored"):
        assert got[key] == want[key], key
    assert sum(got["class-total"]) == want["num-examples"]  # a personalize reply's num-examples: its train set
    assert got["personalized"] == 1

    classes = num_classes(small_cfg)
    strategy = FedPuReLStrategy({"ctx": tuple(phi_g["ctx"].shape)}, num_classes=classes)
    (pair,) = strategy.read_replies(
        "personal", [merged_reply], lambda m: PersonalizeReply.read(metrics_of(m), classes, True)
    )
    assert pair[1].evaluation == EvaluateReply.read(want, classes).evaluation
    # Read as a reply without an evaluation, the merged reply does not follow the protocol.
    assert (
        strategy.read_replies(
            "personal", [merged_reply], lambda m: PersonalizeReply.read(metrics_of(m), classes, False)
        )
        == []
    )
    messages = strategy.configure_personalize(ArrayRecord(phi_g), Instruction(3, evaluate=True), FakeGrid([5, 6]))
    assert [m.content["config"]["evaluate"] for m in messages] == [True, True]
    assert all(
        "evaluate" not in m.content["config"]
        for m in strategy.configure_personalize(ArrayRecord(phi_g), Instruction(3), FakeGrid([5, 6]))
    )
