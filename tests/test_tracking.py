"""TensorBoard event files (and MLflow) hold what results.json holds, read back with their own readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedpurel_app.tracking import step_scalars
from tests.conftest import SMALL_RUN
from tests.fake_grid import DirectGrid, Killed, only_run_dir, run_server, set_task_identity

NODES = 3
RUN = {
    **SMALL_RUN,
    "train.rounds": 3,
    "personalize.rounds": 2,
    "train.min-nodes": NODES,
    "data.client-test-size": 20,
    "track.image-every": 2,
}


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    set_task_identity(monkeypatch)


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def scalar(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in acc.Scalars(tag)}


def expected_scalars(results: dict) -> dict[str, dict[int, float]]:
    """What the event files must hold, computed from results.json alone."""
    out: dict[str, dict[int, float]] = {}
    zero_shot = results["zero_shot"]
    steps = [(0, zero_shot["gm"], zero_shot.get("pm"), None)]
    steps += [(r["round"], r.get("gm"), r.get("pm"), r.get("train")) for r in results["rounds"]]
    for step, gm, pm, train in steps:
        for tag, value in step_scalars(gm, pm, train).items():
            out.setdefault(tag, {})[step] = value
    return out


def assert_events_match(run_dir: Path) -> EventAccumulator:
    results = json.loads((run_dir / "results.json").read_text())
    acc = events(run_dir)
    expected = expected_scalars(results)
    assert {"gm/all", "gm/few", "gm/balancedness", "pm/all", "train/conflict-rate", "train/task-loss"} <= set(expected)
    for tag, values in expected.items():
        got = scalar(acc, tag)
        assert got.keys() == values.keys(), f"{tag}: steps {sorted(got)} != {sorted(values)}"
        for step, value in values.items():
            assert got[step] == pytest.approx(value, rel=1e-6), f"{tag} at step {step}"
    tags = acc.Tags()
    for tag in ("round/replies", "round/bytes-up", "round/bytes-down", "round/seconds"):
        assert len(acc.Scalars(tag)) == 1 + len(results["rounds"]), tag
    assert "gm/per_class" in tags["histograms"]
    images = [e.step for e in acc.Images("classes/accuracy_vs_count")]
    assert images == [0, 2, 3], "every track.image-every rounds and the last GM round"
    return acc


def test_a_run_writes_every_round_as_results_json_records_it(tmp_path):
    run = {**RUN, "output-dir": str(tmp_path)}
    run_server(run, DirectGrid(run, NODES))
    run_dir = only_run_dir(tmp_path)
    acc = assert_events_match(run_dir)
    bytes_up = scalar(acc, "round/bytes-up")
    assert bytes_up[1] > bytes_up[4] > 0, "a Stage-1 round uploads phi_g; a personalization round only metrics"
    results = json.loads((run_dir / "results.json").read_text())
    # the config goes in as hyper-parameters, with the final metrics
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    assert data.session_start_info.hparams["train.rounds"].number_value == 3
    assert data.session_start_info.hparams["method.name"].string_value == "fedpurel"
    final = scalar(acc, "final/gm_all")
    assert list(final.values()) == [pytest.approx(results["final"]["gm"]["all"])]


def test_a_resumed_run_continues_its_curves_without_duplicate_steps(tmp_path):
    run = {**RUN, "output-dir": str(tmp_path)}
    with pytest.raises(Killed):
        run_server(run, DirectGrid(run, NODES, kill_at_round=3))
    run_dir = only_run_dir(tmp_path)
    resumed = {**run, "resume-from": str(run_dir)}
    run_server(resumed, DirectGrid(resumed, NODES, node_id=lambda i: 700 - i))
    acc = assert_events_match(run_dir)
    assert sorted(scalar(acc, "gm/all")) == [0, 1, 2, 3]


def test_tensorboard_off_writes_no_events(tmp_path):
    run = {**RUN, "output-dir": str(tmp_path), "track.tensorboard": False}
    run_server(run, DirectGrid(run, NODES))
    assert not (only_run_dir(tmp_path) / "tensorboard").exists()


def test_mlflow_in_a_local_store_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # must not be used
    run = {**RUN, "output-dir": str(tmp_path / "out"), "track.mlflow": True, "train.rounds": 2, "personalize.rounds": 1}
    run_server(run, DirectGrid(run, NODES))
    run_dir = only_run_dir(tmp_path / "out")
    results = json.loads((run_dir / "results.json").read_text())
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run_info = client.get_run(results["mlflow_run"])
    assert run_info.data.params["method.name"] == "fedpurel"
    history = {m.step: m.value for m in client.get_metric_history(results["mlflow_run"], "gm.all")}
    assert history == {
        0: pytest.approx(results["zero_shot"]["gm"]["all"]),
        **{r["round"]: pytest.approx(r["gm"]["all"]) for r in results["rounds"] if "gm" in r},
    }
    assert run_info.info.status == "FINISHED"
