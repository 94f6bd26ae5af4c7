"""TensorBoard event files (and MLflow) hold what results.json holds, read back with their own readers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from fedpurel_app.server import ServerRun
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


SIZES = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}  # keep every event


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance=SIZES)
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


def assert_events_match(run_dir: Path, acc: EventAccumulator | None = None, flower: bool = True) -> EventAccumulator:
    """Every scalar of results.json at its step, once; ``flower``: a ServerApp run (it counts replies and bytes)."""
    results = json.loads((run_dir / "results.json").read_text())
    acc = acc or events(run_dir)
    expected = expected_scalars(results)
    required = {"gm/all", "gm/few", "gm/balancedness", "pm/all", "train/task-loss"}
    if results["method"]["name"] == "fedpurel":
        required |= {"train/conflict-rate", "train/mean-cosine", "train/align-loss"}
    assert required <= set(expected), sorted(required - set(expected))
    tags = acc.Tags()
    for tag, values in expected.items():
        steps = [event.step for event in acc.Scalars(tag)]
        assert steps == sorted(values), f"{tag}: steps {steps} != {sorted(values)}"
        got = scalar(acc, tag)
        for step, value in values.items():
            assert got[step] == pytest.approx(value, rel=1e-6), f"{tag} at step {step}"
    every_step = sorted({0, *(r["round"] for r in results["rounds"])})  # a final PM evaluation shares its round
    for tag in ("round/replies", "round/bytes-up", "round/bytes-down", "round/seconds") if flower else ():
        assert [event.step for event in acc.Scalars(tag)] == every_step, tag
    elapsed = scalar(acc, "round/elapsed")
    last = next(r for r in results["rounds"] if r["round"] == every_step[-1])  # the first step of the last round
    assert list(elapsed) == every_step and elapsed[last["round"]] == pytest.approx(last["wall_time"], abs=0.5)
    gm_steps = [0] + [r["round"] for r in results["rounds"] if r.get("gm")]
    assert [e.step for e in acc.Histograms("gm/per_class")] == gm_steps
    assert "pm/per_class" in tags["histograms"]
    final = {tag: scalar(acc, tag) for tag in tags["scalars"] if tag.startswith("final/")}
    for model in ("gm", "pm"):
        for key in ("all", "many", "medium", "few", "balancedness"):
            assert list(final[f"final/{model}_{key}"].values()) == [pytest.approx(results["final"][model][key])], (
                f"final/{model}_{key}"
            )
    return acc


def test_a_run_writes_every_round_as_results_json_records_it(tmp_path):
    run = {**RUN, "output-dir": str(tmp_path)}
    run_server(run, DirectGrid(run, NODES))
    run_dir = only_run_dir(tmp_path)
    acc = assert_events_match(run_dir)
    images = [e.step for e in acc.Images("classes/accuracy_vs_count")]
    assert images == [0, 2, 3], "every track.image-every rounds and the last GM round"
    bytes_up = scalar(acc, "round/bytes-up")
    assert bytes_up[1] > bytes_up[4] > 0, "a Stage-1 round uploads phi_g; a personalization round only metrics"
    results = json.loads((run_dir / "results.json").read_text())
    # the config goes in as hyper-parameters, with the final metrics
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    assert data.session_start_info.hparams["train.rounds"].number_value == 3
    assert data.session_start_info.hparams["method.name"].string_value == "fedpurel"
    assert data.session_start_info.hparams["track.image-every"].number_value == 2
    assert list(scalar(acc, "final/gm_all")) == [len(results["rounds"])], "the final metrics at the last step"


def raw_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps of ``tag`` in every event file of the run, as written (no reader's purge)."""
    steps = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def test_a_resumed_run_continues_its_curves_without_duplicate_steps(tmp_path, monkeypatch):
    """The server dies after it wrote round 2 to the trackers and before it checkpointed it:
    the resumed run writes round 2 again, and TensorBoard's reader shows each step once."""
    run = {**RUN, "output-dir": str(tmp_path)}
    checkpoint = ServerRun.checkpoint

    def dies_before_checkpointing_round_2(self, index, step):
        if step.round == 2:
            raise Killed("killed after recording round 2")
        checkpoint(self, index, step)

    with monkeypatch.context() as patch:
        patch.setattr(ServerRun, "checkpoint", dies_before_checkpointing_round_2)
        with pytest.raises(Killed):
            run_server(run, DirectGrid(run, NODES))
    run_dir = only_run_dir(tmp_path)
    assert raw_steps(run_dir, "gm/all") == [0, 1, 2]
    resumed = {**run, "resume-from": str(run_dir)}
    run_server(resumed, DirectGrid(resumed, NODES, node_id=lambda i: 700 - i))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2, "one event file per process"
    assert Counter(raw_steps(run_dir, "gm/all"))[2] == 2, "both processes wrote round 2"
    acc = assert_events_match(run_dir)
    assert [e.step for e in acc.Scalars("gm/all")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Images("classes/accuracy_vs_count")] == [0, 2, 3]


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
    assert len(run_info.data.params) == len(results["config"]), "every config key, in batches of at most 100"
    final = client.get_metric_history(results["mlflow_run"], "final.gm_all")
    assert [(m.step, m.value) for m in final] == [
        (results["rounds"][-1]["round"], pytest.approx(results["final"]["gm"]["all"]))
    ]
    assert run_info.info.status == "FINISHED"


def test_a_comparison_puts_each_run_in_its_own_tensorboard_run(tmp_path, monkeypatch):
    """`fedpurel compare` (the in-process engine, two jobs side by side): a reader pointed at the
    comparison's folder finds one run per job, each holding what its results.json holds."""
    from fedpurel_cli import compare

    monkeypatch.setenv("NUM_SUPERNODES", "3")
    monkeypatch.delenv(compare.RUN_COMMAND_ENV, raising=False)
    out = tmp_path / "cmp"
    small = "train.rounds=2 personalize.rounds=1 train.local-epochs=1 data.client-test-size=20"
    argv = ["--out", str(out), "--methods", "fedpurel,promptfl", "--seeds", "0", "--engine", "inprocess"]
    assert compare.main([*argv, "--jobs", "2", small]) == 0
    multiplexer = EventMultiplexer(size_guidance=SIZES)
    multiplexer.AddRunsFromDirectory(str(out))
    multiplexer.Reload()
    runs = {Path(name).parts[:3]: name for name in multiplexer.Runs()}
    assert sorted(runs) == [("runs", "fedpurel", "seed0"), ("runs", "promptfl", "seed0")], multiplexer.Runs()
    for (_, method, _), name in runs.items():
        run_dir = (out / name).parent
        assert json.loads((run_dir / "results.json").read_text())["config"]["method.name"] == method
        assert_events_match(run_dir, multiplexer.GetAccumulator(name), flower=False)
