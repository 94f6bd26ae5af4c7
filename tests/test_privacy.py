"""Client-level DP of the Stage-1 updates: clipping, noise, accounting, and nothing changes with DP off."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client_app import app as client
from fedpurel_app import protocol
from fedpurel_app.config import ConfigError
from fedpurel_app.privacy import PrivacyAccountant, clip_update, noise_for_epsilon, private_mean, update_norm
from fedpurel_app.protocol import Instruction
from server_app.strategy import FedPuReLStrategy
from tests.conftest import SMALL_RUN, make_cfg
from tests.fake_grid import DirectGrid, only_run_dir, run_server, set_task_identity


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    set_task_identity(monkeypatch)


def test_our_key_is_the_one_flowers_fixedclipping_mod_reads():
    assert protocol.CLIPPING_NORM == KEY_CLIPPING_NORM


def test_clipping_scales_the_update_to_the_norm_and_keeps_its_direction():
    old = {"a": torch.zeros(3), "b": torch.ones(2)}
    new = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0, 5.0])}  # update (3,0,0 | 0,4): norm 5
    clipped = clip_update(new, old, 1.0)
    assert update_norm(clipped, old) == pytest.approx(1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([1.0, 1.8]))
    assert clip_update(new, old, 10.0)["b"].equal(new["b"]), "an update within the norm is unchanged"


def message(phi_g: dict, clipping: float | None) -> Message:
    config = ConfigRecord(Instruction(1, "", None, False, clipping).to_config())
    return Message(
        RecordDict({protocol.ARRAYS: ArrayRecord(phi_g), protocol.CONFIG: config}),
        dst_node_id=100,
        message_type=protocol.TRAIN,
    )


def test_the_client_app_clips_every_update_to_the_norm_with_flowers_mod():
    cfg = make_cfg({**SMALL_RUN, "peft.prompt.lr": 0.5})
    from fedpurel_app.data.client import global_test
    from fedpurel_app.inputs import clip_of
    from fedpurel_app.peft.base import build_peft

    data = global_test(cfg.data)
    phi_g = build_peft(cfg, clip_of(cfg.model, cfg.data), data.classnames, data.template).global_state()

    def reply(clipping):
        context = Context(
            run_id=1,
            node_id=100,
            node_config={"partition-id": 0, "num-partitions": 2},
            state=RecordDict(),
            run_config={**SMALL_RUN, "peft.prompt.lr": 0.5},
        )
        out = client.app(message(phi_g, clipping), context)
        return out.content.array_records[protocol.ARRAYS].to_torch_state_dict()

    free = reply(None)
    norm = update_norm(free, phi_g)
    assert norm > 0.01
    clipped = reply(norm / 4)
    assert update_norm(clipped, phi_g) == pytest.approx(norm / 4, rel=1e-4)
    direction = {k: (clipped[k] - phi_g[k]) * 4 + phi_g[k] for k in phi_g}
    assert torch.allclose(direction["ctx"], free["ctx"], atol=1e-5)
    loose = reply(norm * 2)  # within the norm: the same update (Flower re-adds it to phi_g in float32)
    assert torch.allclose(loose["ctx"], free["ctx"], atol=1e-6)
    untouched = reply(None)
    assert untouched["ctx"].equal(free["ctx"]), "without a clipping norm the reply is exactly the unclipped one"


def test_without_a_clipping_norm_the_mod_is_not_even_called(monkeypatch):
    calls = []
    monkeypatch.setattr(client, "fixedclipping_mod", lambda *a: calls.append(a))
    sentinel = object()
    assert client.dp_clipping(message({"ctx": torch.zeros(2)}, None), None, lambda m, c: sentinel) is sentinel
    assert calls == []


def test_the_noise_has_the_std_the_formula_says():
    """Zero updates: the release is phi_g + N(0, (z C / m)^2); n = 200,000 draws, fixed seed. The sample
    variance's relative standard error is sqrt(2 / n) = 0.32 %: 5 of them is 1.6 %."""
    z, c, m, n = 1.3, 0.2, 8, 200_000
    phi_g = {"w": torch.zeros(n)}
    released = private_mean(phi_g, [phi_g] * 5, m, z, c, torch.Generator().manual_seed(0))["w"].double()
    expected = z * c / m
    assert float(released.std()) == pytest.approx(expected, rel=5 * math.sqrt(2 / n))
    assert abs(float(released.mean())) < 5 * expected / math.sqrt(n)


def test_the_release_is_the_uniform_mean_of_the_clipped_updates_plus_noise():
    phi_g = {"w": torch.zeros(2)}
    updates = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}]  # the second is clipped to 1
    quiet = private_mean(phi_g, updates, 4, 0.0, 1.0)  # no noise: exactly (u1 + clip(u2)) / 4, whatever n_k
    assert torch.allclose(quiet["w"], torch.tensor([0.25, 0.25]))


def reference_epsilon(z: float, population: int, sampled: list[int], delta: float) -> float:
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(z / 2)
    first, rest = sampled[0], sampled[1:]
    accountant.compose(
        gaussian if first == population else dp_accounting.SampledWithoutReplacementDpEvent(population, first, gaussian)
    )
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(population, rest[0], gaussian), len(rest)
        )
    )
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("z", "population", "m", "rounds"), [(1.0, 20, 8, 30), (3.0, 100, 10, 50), (0.8, 10, 4, 5)])
def test_epsilon_is_the_accountant_librarys_own_value(z, population, m, rounds):
    accountant = PrivacyAccountant(z, population, 1e-5)
    sampled = [population] + [m] * (rounds - 1)
    for k in sampled:
        accountant.add_round(k)
    assert accountant.epsilon() == pytest.approx(reference_epsilon(z, population, sampled, 1e-5), rel=1e-9)


def test_more_noise_spends_less_and_the_target_epsilon_is_met():
    sampled = [20] + [8] * 29
    z = noise_for_epsilon(8.0, 1e-4, 20, sampled)
    accountant = PrivacyAccountant(z, 20, 1e-4)
    for k in sampled:
        accountant.add_round(k)
    assert accountant.epsilon() <= 8.0
    looser = PrivacyAccountant(z * 0.98, 20, 1e-4)
    for k in sampled:
        looser.add_round(k)
    assert looser.epsilon() > 8.0, "the smallest such noise multiplier, to 1e-2 relative"


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"dp.enabled": True, "dp.noise-multiplier": 0.0}, "dp.enabled needs noise"),
        ({"dp.clipping-norm": 0.0}, "key 'dp.clipping-norm'"),
        ({"dp.delta": 1.0}, "key 'dp.delta'"),
        ({"dp.noise-multiplier": -1.0}, "key 'dp.noise-multiplier'"),
        ({"dp.enabled": 1}, "key 'dp.enabled'"),
    ],
)
def test_a_bad_dp_config_is_one_clear_message(overrides, says):
    with pytest.raises(ConfigError, match=says):
        make_cfg(overrides)


def reply(src: int, phi: dict, request: Message, n: int = 10) -> Message:
    request = Message(request.content, dst_node_id=src, message_type=request.metadata.message_type)
    metrics = MetricRecord({"num-examples": n, "partition-id": src})
    return Message(RecordDict({protocol.ARRAYS: ArrayRecord(phi), protocol.METRICS: metrics}), reply_to=request)


class Nodes:
    def get_node_ids(self):
        return [0, 1]


def test_the_server_drops_an_update_beyond_the_clipping_norm():
    dp = make_cfg({"dp.enabled": True, "dp.clipping-norm": 1.0, "dp.noise-multiplier": 0.0001}).dp
    strategy = FedPuReLStrategy({"w": (2,)}, min_available_nodes=2, dp=dp, max_examples=100)
    (request, _) = strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), Instruction(1), Nodes())
    honest, greedy = {"w": torch.tensor([0.6, 0.0])}, {"w": torch.tensor([0.0, 5.0])}
    arrays, _ = strategy.aggregate_train(1, [reply(0, honest, request), reply(1, greedy, request)])
    released = arrays.to_torch_state_dict()["w"]
    assert released[0] == pytest.approx(0.3, abs=1e-3) and released[1] == pytest.approx(0.0, abs=1e-3)


def test_dp_off_aggregates_exactly_as_plain_fedavg_and_sends_no_clipping_norm():
    strategy = FedPuReLStrategy({"w": (2,)}, min_available_nodes=2, max_examples=100)
    (request, _) = strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), Instruction(1), Nodes())
    assert protocol.CLIPPING_NORM not in request.content[protocol.CONFIG]
    a, b = {"w": torch.tensor([0.1, 0.7])}, {"w": torch.tensor([0.3, 0.2])}
    arrays, _ = strategy.aggregate_train(1, [reply(0, a, request, 30), reply(1, b, request, 10)])
    expected = np.array([0.1, 0.7], np.float32) * 0.75 + np.array([0.3, 0.2], np.float32) * 0.25
    assert np.array_equal(arrays.to_torch_state_dict()["w"].numpy(), expected.astype(np.float32))


def test_dp_off_is_bitwise_the_run_without_any_dp_key(tmp_path):
    """A whole run with ``dp.enabled = false`` and every other dp key far from its default gives bitwise
    the phi_g and the round results of the run config without a dp key (the config of every run before
    DP existed): DP off neither clips, nor adds noise, nor changes the weighting or the messages."""
    from safetensors.torch import load_file

    base = {
        **SMALL_RUN,
        "train.rounds": 2,
        "personalize.rounds": 1,
        "train.min-nodes": 2,
        "train.fraction": 0.5,
        "data.client-test-size": 10,
    }
    off = {"dp.enabled": False, "dp.clipping-norm": 1e-6, "dp.noise-multiplier": 50.0, "dp.delta": 0.5}
    outcomes = []
    for name, run in (("plain", base), ("off", {**base, **off})):
        run = {**run, "output-dir": str(tmp_path / name)}
        grid = DirectGrid(run, 2)
        run_server(run, grid)
        folder = only_run_dir(tmp_path / name)
        results = json.loads((folder / "results.json").read_text())
        assert "privacy" not in results and all("privacy" not in r for r in results["rounds"])
        configs = [m.content[protocol.CONFIG] for m in grid.sent]
        assert all(protocol.CLIPPING_NORM not in c for c in configs), "no message asks for clipping"
        drop = lambda d: {k: v for k, v in d.items() if k != "wall_time"}  # noqa: E731
        comparable = {"rounds": [drop(r) for r in results["rounds"]], "final": drop(results["final"])}
        outcomes.append((comparable, load_file(str(folder / "phi_g.safetensors"))))
    (plain, plain_phi), (dp_off, off_phi) = outcomes
    assert dp_off == plain
    assert plain_phi.keys() == off_phi.keys() and all(torch.equal(plain_phi[k], off_phi[k]) for k in plain_phi)


def test_a_dp_run_reports_the_privacy_spent_every_round(tmp_path):
    run = {
        **SMALL_RUN,
        "train.rounds": 3,
        "train.min-nodes": 4,
        "data.client-test-size": 20,
        "output-dir": str(tmp_path),
        "dp.enabled": True,
        "dp.clipping-norm": 0.05,
        "dp.noise-multiplier": 1.5,
    }
    run_server(run, DirectGrid(run, 4))
    results = json.loads((only_run_dir(tmp_path) / "results.json").read_text())
    spent = [r["privacy"] for r in results["rounds"] if r["phase"] == "global"]
    assert [set(p) for p in spent] == [{"epsilon", "delta", "noise_multiplier", "clipping_norm"}] * 3
    epsilons = [p["epsilon"] for p in spent]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert epsilons[-1] == pytest.approx(reference_epsilon(1.5, 4, [4, 2, 2], 1e-4), rel=1e-9)
    assert results["privacy"]["releases"] == [4, 2, 2]


def test_an_unreachable_target_epsilon_is_one_config_error():
    from fedpurel_app.errors import ConfigError
    from fedpurel_app.privacy import noise_for_epsilon

    with pytest.raises(ConfigError, match=r"dp\.target-epsilon = 1e-06 is out of reach"):
        noise_for_epsilon(1e-6, 1e-4, 20, [20] + [8] * 29)
