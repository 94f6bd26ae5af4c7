"""Server checkpoint and resume, without Flower processes.

A fake grid delivers the ServerApp's messages straight to the ClientApp's
handlers (one Context per simulated SuperNode), so the real round loop of
server_app/app.py runs in this process. A run "killed" after round k (the
grid raises while the next round is sent) and resumed with ``resume-from``
must end with exactly the phi_g (bitwise) and round results of an
uninterrupted run with the same seed; a tampered, corrupt or mismatched
checkpoint is refused with one message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from safetensors.torch import load_file

from client_app import app as client
from fedpurel_app.checkpoint import CheckpointError, load_checkpoint
from fedpurel_app.config import parse_run_config
from server_app import app as server
from server_app.strategy import PERSONALIZE
from tests.conftest import SMALL_RUN

NODES = 3
RUN = {**SMALL_RUN, "num-rounds": 3, "personal-rounds": 2, "min-nodes": NODES, "fraction-train": 0.67,
       "client-test-size": 20}


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    """Messages are built outside a Flower process here: give them the identity one would have."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            patch.setattr(TaskIdentity, name, value)
        yield


class Killed(Exception):
    """The server process dies."""


class DirectGrid:
    """A Grid whose SuperNodes are ClientApp handlers called in this process."""

    HANDLERS = {MessageType.TRAIN: client.train, PERSONALIZE: client.personalize, MessageType.EVALUATE: client.evaluate}

    def __init__(self, run_config: dict, contexts: dict[int, Context] | None = None, kill_at_round: int | None = None,
                 state_root: Path | None = None, node_id=lambda i: 100 + i):
        def node_config(i: int) -> dict:
            extra = {"state-dir": str(state_root / f"node{i}")} if state_root else {}
            return {"partition-id": i, "num-partitions": NODES, **extra}

        self.contexts = contexts or {
            node_id(i): Context(run_id=1, node_id=node_id(i), node_config=node_config(i),
                                state=RecordDict(), run_config=dict(run_config))
            for i in range(NODES)
        }
        for context in self.contexts.values():
            context.run_config.clear()
            context.run_config.update(run_config)
        self.kill_at_round = kill_at_round
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Run each message's handler at once; its reply (if any) waits for pull_messages."""
        ids = []
        for i, msg in enumerate(messages):
            rnd = int(msg.content["config"]["server-round"])
            if rnd == self.kill_at_round:
                raise Killed(f"killed while sending round {rnd}")
            msg.metadata.__dict__["_message_id"] = f"{rnd}-{msg.metadata.message_type}-{i}"
            ids.append(msg.metadata.message_id)
            reply = self.reply(msg, rnd)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
        return ids

    def reply(self, msg: Message, server_round: int) -> Message | None:
        """What the node answers to ``msg`` (None: it never answers)."""
        return self.HANDLERS[msg.metadata.message_type](msg, self.contexts[msg.metadata.dst_node_id])

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def run_server(run_config: dict, grid: DirectGrid) -> None:
    cfg = parse_run_config(run_config)
    server._run(grid, cfg, server._Setup(cfg))


def only_run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def comparable(results: dict) -> dict:
    """Results without wall times and the resume log."""
    drop = lambda d: {k: v for k, v in d.items() if k != "wall_time"}  # noqa: E731
    return {
        "zero_shot": results["zero_shot"],
        "rounds": [drop(r) for r in results["rounds"]],
        "final": drop(results["final"]),
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, task_identity):
    out = tmp_path_factory.mktemp("full")
    config = {**RUN, "output-dir": str(out)}
    run_server(config, DirectGrid(config))
    run_dir = only_run_dir(out)
    return run_dir, json.loads((run_dir / "results.json").read_text()), load_file(str(run_dir / "phi_g.safetensors"))


def kill_then_resume(tmp_path: Path, kill_at_round: int, keep_clients: bool, state_root: Path | None = None):
    config = {**RUN, "output-dir": str(tmp_path / "out")}
    grid = DirectGrid(config, kill_at_round=kill_at_round, state_root=state_root)
    with pytest.raises(Killed):
        run_server(config, grid)
    run_dir = only_run_dir(tmp_path / "out")
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["round"] == kill_at_round - 1
    resumed = {**config, "resume-from": str(run_dir)}
    # keep_clients: only the server died; otherwise every SuperNode restarts with an empty context.state
    # and new node ids, here in the reverse order of their partitions (ids are not stable across restarts)
    run_server(resumed, DirectGrid(resumed, contexts=grid.contexts if keep_clients else None, state_root=state_root,
                                   node_id=lambda i: 300 - i))
    assert only_run_dir(tmp_path / "out") == run_dir, "the resumed run continues in the same folder"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_after_rounds"] == [kill_at_round - 1]
    return results, load_file(str(run_dir / "phi_g.safetensors"))


def assert_same_run(uninterrupted, results, phi_g):
    _, expected_results, expected_phi_g = uninterrupted
    assert phi_g.keys() == expected_phi_g.keys()
    for key in phi_g:
        assert torch.equal(phi_g[key], expected_phi_g[key]), f"phi_g['{key}'] differs"
    assert comparable(results) == comparable(expected_results)


def test_stage1_resume_with_restarted_clients_is_exact(uninterrupted, tmp_path):
    """Killed during round 3 of Stage 1; clients lost all their state too."""
    assert_same_run(uninterrupted, *kill_then_resume(tmp_path, kill_at_round=3, keep_clients=False))


def test_stage2_resume_with_surviving_clients_is_exact(uninterrupted, tmp_path):
    """Killed during the 2nd personal round; the SuperNodes (and their phi_k) survived."""
    assert_same_run(uninterrupted, *kill_then_resume(tmp_path, kill_at_round=5, keep_clients=True))


def test_stage2_resume_with_restarted_clients_that_keep_a_state_dir_is_exact(uninterrupted, tmp_path):
    """Server and SuperNodes all restarted; each node kept phi_k in its node-config state-dir."""
    results, phi_g = kill_then_resume(tmp_path, kill_at_round=5, keep_clients=False, state_root=tmp_path / "nodes")
    assert_same_run(uninterrupted, results, phi_g)


def test_stage2_resume_with_restarted_clients_restarts_their_private_state(uninterrupted, tmp_path):
    """Documented behaviour: phi_k lives on the clients, not in the server checkpoint. If the
    SuperNodes restarted too, the resumed personal rounds start phi_k from its initial value:
    the run completes, phi_g (frozen in Stage 2) is exact, Stage-2 metrics may differ."""
    results, phi_g = kill_then_resume(tmp_path, kill_at_round=5, keep_clients=False)
    _, expected_results, expected_phi_g = uninterrupted
    assert all(torch.equal(phi_g[k], expected_phi_g[k]) for k in phi_g)
    assert comparable(results)["rounds"][:4] == comparable(expected_results)["rounds"][:4]
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4, 5]
    assert results["final"]["pm"]["personalized"] is True


def test_checkpoint_is_written_every_round_and_keeps_one_phi_g(uninterrupted):
    run_dir, results, phi_g = uninterrupted
    folder = run_dir / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    assert (state["round"], state["phase"]) == (5, "personal")
    assert [p.name for p in folder.glob("*.safetensors")] == ["phi_g-round5.safetensors"]
    assert state["results"]["rounds"] == results["rounds"]


# ----------------------------------------------------------------- refused checkpoints
@pytest.fixture
def checkpointed(uninterrupted, tmp_path):
    """A copy of the finished run folder, free to damage."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    cfg = parse_run_config({**RUN, "output-dir": str(tmp_path), "resume-from": str(run_dir)})
    return run_dir, cfg


def refusal(cfg) -> str:
    with pytest.raises(CheckpointError) as err:
        server._Setup(cfg)
    return str(err.value)


def test_intact_checkpoint_loads(checkpointed):
    run_dir, cfg = checkpointed
    setup = server._Setup(cfg)
    assert setup.resumed.round == 5 and setup.recorder.run_dir == run_dir


def test_tampered_phi_g_is_refused(checkpointed):
    run_dir, cfg = checkpointed
    (path,) = (run_dir / "checkpoint").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert "does not match the checksum" in refusal(cfg)


def test_edited_state_is_refused(checkpointed):
    run_dir, cfg = checkpointed
    path = run_dir / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state["round"] = 2
    path.write_text(json.dumps(state))
    assert "fails its integrity check" in refusal(cfg)


def test_truncated_state_is_refused(checkpointed):
    run_dir, cfg = checkpointed
    path = run_dir / "checkpoint" / "state.json"
    path.write_text(path.read_text()[:100])
    assert "is corrupt" in refusal(cfg)


def test_missing_checkpoint_is_refused(checkpointed, tmp_path):
    _, cfg = checkpointed
    message = refusal(cfg.model_copy(update={"resume_from": str(tmp_path / "nowhere")}))
    assert "no " in message and "state.json" in message


def test_mismatched_config_is_refused_naming_the_keys(checkpointed):
    _, cfg = checkpointed
    message = refusal(cfg.model_copy(update={"lr": 0.5, "seed": 3}))
    assert "lr: 0.05 -> 0.5" in message and "seed: 0 -> 3" in message


def test_operational_keys_may_change(checkpointed, tmp_path):
    run_dir, _ = checkpointed
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    load_checkpoint(run_dir, {**state["config"], "round-timeout": 5.0, "output-dir": "elsewhere"}, {"ctx": (4, 64)})


def test_the_server_app_reports_a_refused_checkpoint_in_one_line(checkpointed, caplog, monkeypatch):
    run_dir, cfg = checkpointed
    (run_dir / "checkpoint" / "state.json").write_text("{")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flower())
    monkeypatch.setattr(server, "_run", lambda *a: pytest.fail("the run started"))
    with caplog.at_level("ERROR", logger="flwr"):
        server.main(None, context)
    assert "FedPuReL run stopped before training: cannot resume from" in caplog.text
    assert "Traceback" not in caplog.text
