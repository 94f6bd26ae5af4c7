"""Stage 1 through Flower's SecAgg+ (``secagg.enabled``): the ClientApp behind ``secaggplus_mod``,
rounds aggregated by ``SecAggPlusWorkflow`` inside the ServerApp's own loop (in this process; the
loopback deployment with TLS and node authentication is in tests/test_deployment.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from safetensors.torch import load_file

from fedpurel_app import protocol
from fedpurel_app.errors import ClientError, ConfigError
from fedpurel_app.protocol import Instruction, ProtocolError
from server_app.secagg import quantization_bound
from tests.conftest import SMALL_RUN
from tests.fake_grid import DirectGrid, only_run_dir, run_server, set_task_identity

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from secagg_stage1 import one_round  # noqa: E402

CLIENTS = 4
RUN = {**SMALL_RUN, "personalize.rounds": 0, "track.tensorboard": False}


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    set_task_identity(monkeypatch)


def test_the_instruction_carries_the_tensor_order_and_the_range_and_refuses_half_of_them():
    sent = Instruction(3, "run", (5, 1), False, 0.5, ("b", "a"), 0.5)
    assert Instruction.read(sent.to_config()) == sent
    config = sent.to_config()
    del config[protocol.SECAGG_RANGE]
    with pytest.raises(ProtocolError, match="come together"):
        Instruction.read(config)
    with pytest.raises(ProtocolError, match="expected a list of tensor names"):
        Instruction.read({**sent.to_config(), protocol.SECAGG_NAMES: [1, 2]})
    assert protocol.named(protocol.ordered({"a": 1, "b": 2}, ("b", "a")), ("b", "a")) == {"a": 1, "b": 2}
    with pytest.raises(ProtocolError):
        protocol.ordered({"a": 1}, ("a", "b"))


def test_a_client_refuses_to_send_an_update_secagg_would_clip_or_a_non_finite_one():
    import numpy as np

    assert protocol.update_problem({"w": np.array([0.5, -1.0])}, 1.0) is None
    assert "secagg.clipping-range" in protocol.update_problem({"w": np.array([0.5, -1.5])}, 1.0)
    assert "not finite" in protocol.update_problem({"w": np.array([np.nan])}, 1.0)
    assert protocol.secagg_weight(Instruction(1), 37) == 37
    assert protocol.secagg_weight(Instruction(1, clipping_norm=0.1), 37) == 1


def test_the_quantization_bound_by_hand():
    # step 2 * 1 / (5 - 1) = 0.5; ratios round(5 * 1 / 4) / 5 = 0.2, round(5 * 3 / 4) / 5 = 0.8
    # -> 2 clients * 0.5 / (0.2 + 0.8) = 1.0
    assert quantization_bound(1.0, [1, 3], 4.0, 5) == pytest.approx(1.0)


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "dp"])
def test_the_secagg_release_is_the_plain_one_within_quantization_and_the_server_receives_no_update(tmp_path, dp):
    flat = {**RUN, "output-dir": str(tmp_path)}
    out = one_round(flat, CLIENTS, 0.01 if dp else None)
    if dp:
        assert out["update_norms"] == pytest.approx([0.01] * CLIENTS, rel=1e-4), "every update clipped to C"
    assert out["max_error"] <= out["bound"] + 1e-7, "SecAgg+'s mean is the plain one up to its quantization"
    assert out["max_error"] < 1e-2 * out["largest_change"], "the round did move phi_g: the comparison is not vacuous"
    assert out["contributors"] == CLIENTS
    assert out["replies_received"] == len(out["received"]) == 4 * CLIENTS, "four stages, one reply per client each"
    assert out["arrays_received"] == 0
    assert all(not r for m in out["received"] for r in m.content.array_records.values()), "no update in the clear"
    assert all(RECORD_KEY_CONFIGS in m.content.config_records for m in out["received"])
    assert out["metrics"]["task-loss"] > 0 and "partition-id" not in out["metrics"]


def test_the_in_process_engine_refuses_secagg_with_one_message():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "inprocess.py"), "--set", "secagg.enabled=true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "secagg.enabled runs only through Flower (bash scripts/run.sh, a deployment, or fedpurel compare "
        "--engine flower); the in-process engine has no SecAgg+"
    ]


def test_a_run_with_secagg_records_each_rounds_contributors_and_no_array_and_stays_close_to_plain(tmp_path):
    outcome = {}
    for name, extra in (("plain", {}), ("secagg", {"secagg.enabled": True})):
        flat = {**RUN, "output-dir": str(tmp_path / name), **extra}
        grid = DirectGrid(flat, CLIENTS)
        run_server(flat, grid)
        folder = only_run_dir(tmp_path / name)
        arrays = sum(len(r) for m in grid.received if not m.has_error() for r in m.content.array_records.values())
        outcome[name] = (
            json.loads((folder / "results.json").read_text()),
            load_file(str(folder / "phi_g.safetensors")),
            arrays,
        )
    (plain, plain_phi, plain_arrays), (secure, secure_phi, secure_arrays) = outcome["plain"], outcome["secagg"]
    assert plain_arrays > 0 and secure_arrays == 0, "the plain run's server holds every update, the SecAgg+ run's none"
    trains = [r["train"] for r in secure["rounds"] if r["phase"] == "global"]
    assert [t["clients"] for t in trains] == [CLIENTS, 2], "round 1 every client, then train.fraction 0.4 of 4"
    assert [t["secagg-contributors"] for t in trains] == [CLIENTS, 2]
    assert [t["secagg-replies"] for t in trains] == [4 * CLIENTS, 4 * 2]
    assert [t["secagg-arrays-received"] for t in trains] == [0, 0]
    plain_trains = [r["train"] for r in plain["rounds"] if r["phase"] == "global"]
    assert trains[0]["task-loss"] == pytest.approx(plain_trains[0]["task-loss"], rel=1e-9), "round 1: the same updates"
    assert trains[1]["task-loss"] == pytest.approx(plain_trains[1]["task-loss"], rel=1e-2), (
        "round 2: from a close phi_g"
    )
    difference = max(float((secure_phi[k] - plain_phi[k]).abs().max()) for k in plain_phi)
    assert difference < 1e-3, "two rounds later the runs still agree up to quantization's drift"
    assert secure["final"]["gm"]["all"] == pytest.approx(plain["final"]["gm"]["all"], abs=0.02)


def test_updates_beyond_the_range_halt_the_round_with_the_clients_own_message(tmp_path):
    flat = {**RUN, "output-dir": str(tmp_path), "secagg.enabled": True, "secagg.clipping-range": 1e-6}
    with pytest.raises(ClientError, match=r"secure aggregation halted.*raise secagg.clipping-range"):
        run_server(flat, DirectGrid(flat, CLIENTS))


def test_a_round_of_one_client_is_refused_before_training(tmp_path):
    flat = {**RUN, "output-dir": str(tmp_path), "secagg.enabled": True, "train.fraction": 0.25}
    grid = DirectGrid(flat, 3)
    with pytest.raises(ConfigError, match="SecAgg\\+ needs at least 2: raise train.fraction"):
        run_server(flat, grid)
    assert not any(m.metadata.message_type == protocol.TRAIN for m in grid.sent), "no client trained"


def test_plain_stage_1_messages_bypass_secaggplus_mod(tmp_path):
    flat = {**RUN, "output-dir": str(tmp_path), "train.rounds": 1}
    grid = DirectGrid(flat, 2)
    run_server(flat, grid)
    trains = [m for m in grid.received if m.metadata.message_type == protocol.TRAIN]
    assert trains and all(RECORD_KEY_CONFIGS not in m.content.config_records for m in trains)
    assert all(len(m.content.array_records[protocol.ARRAYS]) > 0 for m in trains)
    assert torch.is_tensor(next(iter(trains[0].content[protocol.ARRAYS].to_torch_state_dict().values())))


def test_dp_with_secagg_reports_the_privacy_spent_each_round_and_the_server_holds_no_update(tmp_path):
    flat = {**RUN, "output-dir": str(tmp_path), "secagg.enabled": True, "dp.enabled": True, "dp.clipping-norm": 0.01}
    grid = DirectGrid(flat, CLIENTS)
    run_server(flat, grid)
    results = json.loads((only_run_dir(tmp_path) / "results.json").read_text())
    rounds = [r for r in results["rounds"] if r["phase"] == "global"]
    assert [set(r["privacy"]) for r in rounds] == [{"epsilon", "delta", "noise_multiplier", "clipping_norm"}] * 2
    assert rounds[0]["privacy"]["epsilon"] < rounds[1]["privacy"]["epsilon"]
    assert [r["train"]["secagg-arrays-received"] for r in rounds] == [0, 0]
    assert not any(r for m in grid.received if not m.has_error() for r in m.content.array_records.values())


def test_a_single_round_that_takes_every_client_is_not_refused(tmp_path):
    flat = {**RUN, "output-dir": str(tmp_path), "secagg.enabled": True, "train.fraction": 0.25, "train.rounds": 1}
    run_server(flat, DirectGrid(flat, 3))  # round 1 trains all 3 clients; no later round samples 1
    results = json.loads((only_run_dir(tmp_path) / "results.json").read_text())
    assert results["rounds"][0]["train"]["secagg-contributors"] == 3


class _NodesWithoutIdentity(DirectGrid):
    """The ClientApp as a simulation's Ray actor runs it: without the run's task identity."""

    def reply(self, msg):
        from flwr.supercore.task_identity import TaskIdentity

        names = ("_run_id", "_node_id", "_task_id")
        saved = {name: getattr(TaskIdentity, name) for name in names}
        for name in names:
            setattr(TaskIdentity, name, None)
        try:
            return super().reply(msg)
        finally:
            for name, value in saved.items():
                setattr(TaskIdentity, name, value)


def test_a_client_without_the_runs_identity_takes_part_as_in_a_simulation(tmp_path):
    flat = {**RUN, "output-dir": str(tmp_path), "secagg.enabled": True, "train.rounds": 1}
    run_server(flat, _NodesWithoutIdentity(flat, 3))
    results = json.loads((only_run_dir(tmp_path) / "results.json").read_text())
    assert results["rounds"][0]["train"]["secagg-contributors"] == 3
