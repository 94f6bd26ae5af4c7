"""Server checkpoint and resume, without Flower processes.

A fake grid (tests/fake_grid.py) delivers the ServerApp's messages straight to
the ClientApp's handlers (one Context per simulated SuperNode), so the real
plan executor of server_app/app.py runs in this process. The server
checkpoints after every step of the round plan (checkpoint format 2). A run
"killed" during round k (the grid raises while that round's messages are sent)
and resumed with ``resume-from`` first asks every node which partition it
holds (a ``query`` exchange: node ids change across restarts), then must end
with exactly the phi_g (bitwise) and round results of an uninterrupted run
with the same seed; a tampered, corrupt or mismatched checkpoint is refused
with one message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedpurel_app import protocol
from fedpurel_app.checkpoint import FORMAT, CheckpointError, load_checkpoint
from fedpurel_app.client import node_state_dir
from fedpurel_app.config import fingerprint, parse_node_config
from fedpurel_app.server import ServerRun
from server_app import app as server
from tests.conftest import SMALL_RUN, make_cfg
from tests.fake_grid import DirectGrid as _DirectGrid
from tests.fake_grid import Killed, only_run_dir, run_server, set_task_identity

__all__ = ["RUN", "NODES", "DirectGrid", "Killed", "only_run_dir", "run_server", "task_identity"]

NODES = 3
RUN = {
    **SMALL_RUN,
    "train.rounds": 3,
    "personalize.rounds": 2,
    "train.min-nodes": NODES,
    "train.fraction": 0.67,
    "data.client-test-size": 20,
}
# The plan of RUN: step 0 zero-shot, steps 1-3 Stage-1 rounds 1-3, steps 4-5 personal rounds 4-5.
LAST_STEP = 5


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    """Messages are built outside a Flower process here: give them the identity one would have."""
    with pytest.MonkeyPatch.context() as patch:
        set_task_identity(patch)
        yield


class DirectGrid(_DirectGrid):
    """The shared fake grid with this module's number of nodes."""

    def __init__(self, run_config: dict, **kwargs) -> None:
        super().__init__(run_config, NODES, **kwargs)


def run_tag(run_dir: Path) -> str:
    """The run's name for its nodes, as the server sends it (ServerRun.tag)."""
    results = json.loads((run_dir / "checkpoint" / "state.json").read_text())["results"]
    return results.get("run") or run_dir.name


def node_folders(config: dict, run_dir: Path) -> list[Path]:
    """The state folders of a simulated run's nodes that have no state-dir (in the cache folder)."""
    cfg = make_cfg(config)
    return [
        Path(node_state_dir(cfg, parse_node_config({"partition-id": i, "num-partitions": NODES}), run_tag(run_dir)))
        for i in range(NODES)
    ]


@pytest.fixture(scope="module")
def cleanup_node_folders():
    """Remove the cache folders that simulated nodes of these runs wrote."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        shutil.rmtree(folder.parent, ignore_errors=True)


def comparable(results: dict) -> dict:
    """Results without wall times and the resume log."""
    drop = lambda d: {k: v for k, v in d.items() if k != "wall_time"}  # noqa: E731
    return {
        "zero_shot": results["zero_shot"],
        "rounds": [drop(r) for r in results["rounds"]],
        "final": drop(results["final"]),
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, task_identity, cleanup_node_folders):
    out = tmp_path_factory.mktemp("full")
    config = {**RUN, "output-dir": str(out)}
    grid = DirectGrid(config)
    run_server(config, grid)
    run_dir = only_run_dir(out)
    cleanup_node_folders.extend(node_folders(config, run_dir))
    assert protocol.QUERY not in {m.metadata.message_type for m in grid.sent}, "a fresh run sends no query"
    return run_dir, json.loads((run_dir / "results.json").read_text()), load_file(str(run_dir / "phi_g.safetensors"))


def kill_then_resume(
    tmp_path: Path,
    kill_at_round: int,
    keep_clients: bool,
    state_root: Path | None = None,
    lose_cache: bool = False,
    cleanup: list | None = None,
    caplog=None,
):
    """Kill the server during round ``kill_at_round``, then resume.

    keep_clients: only the server died; otherwise every SuperNode restarts with an empty
    context.state and new node ids, here in the reverse order of their partitions (ids are
    not stable across restarts). lose_cache: the restarted nodes also lost the state folders
    a node without state-dir keeps in the cache folder.
    """
    config = {**RUN, "output-dir": str(tmp_path / "out")}
    grid = DirectGrid(config, kill_at_round=kill_at_round, state_root=state_root)
    with pytest.raises(Killed):
        run_server(config, grid)
    run_dir = only_run_dir(tmp_path / "out")
    folders = node_folders(config, run_dir)
    if cleanup is not None:
        cleanup.extend(folders)
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["format"] == FORMAT
    assert state["round"] == kill_at_round - 1, "the last completed step is the one before the killed round"
    if lose_cache:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    resumed = {**config, "resume-from": str(run_dir)}
    grid = DirectGrid(
        resumed, contexts=grid.contexts if keep_clients else None, state_root=state_root, node_id=lambda i: 300 - i
    )
    if caplog is not None:
        caplog.clear()
        with caplog.at_level("INFO", logger="flwr"):
            run_server(resumed, grid)
    else:
        run_server(resumed, grid)
    # A resumed run first asks every node which partition it holds, before any other message.
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds[:NODES] == [protocol.QUERY] * NODES and protocol.QUERY not in kinds[NODES:]
    assert {m.metadata.dst_node_id for m in grid.sent[:NODES]} == set(grid.contexts)
    # ... and nothing of the steps already done is sent again.
    rounds = [int(m.content[protocol.CONFIG]["server-round"]) for m in grid.sent[NODES:]]
    assert min(rounds) == kill_at_round, rounds
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


def test_stage1_resume_with_restarted_clients_is_exact(uninterrupted, tmp_path, cleanup_node_folders):
    """Killed during round 3 of Stage 1; clients lost all their state too."""
    assert_same_run(
        uninterrupted,
        *kill_then_resume(tmp_path, kill_at_round=3, keep_clients=False, lose_cache=True, cleanup=cleanup_node_folders),
    )


def test_a_kill_during_the_first_round_resumes_after_the_zero_shot_step(uninterrupted, tmp_path, cleanup_node_folders):
    """The zero-shot evaluation is a step of its own: it is checkpointed and not repeated."""
    assert_same_run(
        uninterrupted, *kill_then_resume(tmp_path, kill_at_round=1, keep_clients=False, cleanup=cleanup_node_folders)
    )


def test_stage2_resume_with_surviving_clients_is_exact(uninterrupted, tmp_path, cleanup_node_folders):
    """Killed during the 2nd personal round; the SuperNodes (and their phi_k) survived."""
    assert_same_run(
        uninterrupted, *kill_then_resume(tmp_path, kill_at_round=5, keep_clients=True, cleanup=cleanup_node_folders)
    )


def test_stage2_resume_with_restarted_clients_that_keep_a_state_dir_is_exact(uninterrupted, tmp_path, caplog):
    """Server and SuperNodes all restarted; each node kept phi_k in its node-config state-dir."""
    results, phi_g = kill_then_resume(
        tmp_path, kill_at_round=5, keep_clients=False, state_root=tmp_path / "nodes", caplog=caplog
    )
    assert_same_run(uninterrupted, results, phi_g)
    assert f"{NODES} of {NODES} clients restored their private state" in caplog.text


def test_stage2_resume_with_restarted_simulated_clients_is_exact(uninterrupted, tmp_path, caplog, cleanup_node_folders):
    """Simulated SuperNodes without a state-dir restarted too: they restore phi_k from their
    folder of this run in the cache folder (the run's name comes with every message)."""
    results, phi_g = kill_then_resume(
        tmp_path, kill_at_round=5, keep_clients=False, caplog=caplog, cleanup=cleanup_node_folders
    )
    assert_same_run(uninterrupted, results, phi_g)
    assert f"{NODES} of {NODES} clients restored their private state" in caplog.text


def test_stage2_resume_with_restarted_clients_restarts_their_private_state(
    uninterrupted, tmp_path, cleanup_node_folders
):
    """Documented behaviour: phi_k lives on the clients, not in the server checkpoint. If the
    SuperNodes restarted and lost their state folders too, the resumed personal rounds start
    phi_k from its initial value: the run completes, phi_g (frozen in Stage 2) is exact,
    Stage-2 metrics may differ."""
    results, phi_g = kill_then_resume(
        tmp_path, kill_at_round=5, keep_clients=False, lose_cache=True, cleanup=cleanup_node_folders
    )
    _, expected_results, expected_phi_g = uninterrupted
    assert all(torch.equal(phi_g[k], expected_phi_g[k]) for k in phi_g)
    assert comparable(results)["rounds"][:4] == comparable(expected_results)["rounds"][:4]
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4, 5]
    assert results["final"]["pm"]["personalized"] is True


def test_checkpoint_is_written_after_every_step_and_keeps_one_phi_g(uninterrupted, tmp_path, monkeypatch):
    run_dir, results, phi_g = uninterrupted
    folder = run_dir / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    assert (state["format"], state["step"], state["round"], state["phase"]) == (FORMAT, LAST_STEP, 5, "personal")
    assert [p.name for p in folder.glob("*.safetensors")] == [f"phi_g-step{LAST_STEP}.safetensors"]
    assert state["results"]["rounds"] == results["rounds"]
    assert torch.equal(load_file(str(folder / state["phi_g"]))["ctx"], phi_g["ctx"])

    # One checkpoint per step, in order, each after its step's results were recorded.
    from fedpurel_app import server as library_server

    saved = []
    real = library_server.save_checkpoint

    def spy(run_dir, step, round_, phase, phi_g, config_key, results):
        saved.append((step, round_, phase, len(results["rounds"]), "zero_shot" in results))
        return real(run_dir, step, round_, phase, phi_g, config_key, results)

    monkeypatch.setattr(library_server, "save_checkpoint", spy)
    config = {**RUN, "output-dir": str(tmp_path / "out")}
    run_server(config, DirectGrid(config))
    shutil.rmtree(Path(node_folders(config, only_run_dir(tmp_path / "out"))[0]).parent, ignore_errors=True)
    assert saved == [
        (0, 0, "zero-shot", 0, True),
        (1, 1, "global", 1, True),
        (2, 2, "global", 2, True),
        (3, 3, "global", 3, True),
        (4, 4, "personal", 4, True),
        (5, 5, "personal", 5, True),
    ]


# ----------------------------------------------------------------- refused checkpoints
@pytest.fixture
def checkpointed(uninterrupted, tmp_path):
    """A copy of the finished run folder, free to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    flat = {**RUN, "output-dir": str(tmp_path), "resume-from": str(run_dir)}
    return run_dir, flat


def refusal(flat: dict) -> str:
    with pytest.raises(CheckpointError) as err:
        ServerRun(make_cfg(flat), server.APP_DIR)
    return str(err.value)


def test_intact_checkpoint_loads(checkpointed):
    run_dir, flat = checkpointed
    run = ServerRun(make_cfg(flat), server.APP_DIR)
    assert run.done == LAST_STEP and run.resumed_phase == "personal" and run.run_dir == run_dir


def test_tampered_phi_g_is_refused(checkpointed):
    run_dir, flat = checkpointed
    (path,) = (run_dir / "checkpoint").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert "does not match the checksum" in refusal(flat)


def test_edited_state_is_refused(checkpointed):
    run_dir, flat = checkpointed
    path = run_dir / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state["round"] = 2
    path.write_text(json.dumps(state))
    assert "fails its integrity check" in refusal(flat)


def test_a_checkpoint_of_another_format_is_refused(checkpointed):
    import hashlib

    run_dir, flat = checkpointed
    path = run_dir / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state["format"] = FORMAT - 1
    body = {k: v for k, v in state.items() if k != "state-sha256"}
    state["state-sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(state))
    assert "of another version" in refusal(flat)


def test_truncated_state_is_refused(checkpointed):
    run_dir, flat = checkpointed
    path = run_dir / "checkpoint" / "state.json"
    path.write_text(path.read_text()[:100])
    assert "is corrupt" in refusal(flat)


def test_missing_checkpoint_is_refused(checkpointed, tmp_path):
    _, flat = checkpointed
    message = refusal({**flat, "resume-from": str(tmp_path / "nowhere")})
    assert "no " in message and "state.json" in message


def test_mismatched_config_is_refused_naming_the_keys(checkpointed):
    _, flat = checkpointed
    message = refusal({**flat, "peft.prompt.lr": 0.5, "seed": 3})
    assert "peft.prompt.lr: 0.1 -> 0.5" in message and "seed: 0 -> 3" in message


def test_operational_keys_may_change(checkpointed, tmp_path):
    run_dir, flat = checkpointed
    changed = make_cfg({**flat, "round-timeout": 5.0, "output-dir": "elsewhere"})
    shapes = {k: tuple(v.shape) for k, v in load_file(str(run_dir / "phi_g.safetensors")).items()}
    resumed = load_checkpoint(run_dir, fingerprint(changed, "checkpoint"), shapes)
    assert resumed.step == LAST_STEP
    with pytest.raises(CheckpointError, match="differs"):
        load_checkpoint(run_dir, fingerprint(make_cfg({**flat, "train.rounds": 4}), "checkpoint"), shapes)


def test_the_server_app_reports_a_refused_checkpoint_in_one_line(checkpointed, caplog, monkeypatch):
    from logging import ERROR

    from flwr.common import log

    run_dir, flat = checkpointed
    (run_dir / "checkpoint" / "state.json").write_text("{")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=make_cfg(flat).to_flower())
    monkeypatch.setattr(server, "_execute", lambda *a: pytest.fail("the run started"))
    with caplog.at_level("ERROR", logger="flwr"):
        with pytest.raises(CheckpointError) as err:  # re-raised: Flower records the run as failed
            server.main(None, context)
        # Flower logs the exception that ended the ServerApp; a user error's record has no traceback.
        log(ERROR, "ServerApp thread raised an exception", exc_info=err.value)
    assert "FedPuReL run stopped: cannot resume from" in caplog.text
    assert "Traceback" not in caplog.text
