"""A new PEFT variant and a new method are one module each plus one registry line.

Both are defined here, in this file, with their own configs, and registered.
Nothing else of the project is edited: the run config learns their keys, the
ClientApp trains and personalizes them, the real round loop of the ServerApp
executes the toy method's own plan, and a restarted node restores the toy
method's private state from its state folder.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fedpurel_app.config import MethodConfig, PeftConfig, knob, pyproject_section
from fedpurel_app.methods.base import Method
from fedpurel_app.peft.base import PeftVariant
from fedpurel_app.plan import RoundPlan, Step, standard_plan
from fedpurel_app.registry import METHODS, PEFT_VARIANTS
from fedpurel_app.training import sgd_epochs
from tests.conftest import SMALL_RUN, make_cfg
from tests.fake_grid import DirectGrid, Killed, only_run_dir, run_server, set_task_identity


# ----------------------------------------------------------------------------- the toy variant
class ShiftConfig(PeftConfig):
    """A learned shift of the image embedding."""

    scale: float = knob(0.0, "initial shift, in units of 1/sqrt(D)", ge=0.0)


class Shift(nn.Module):
    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.full((dim,), scale / dim**0.5))


class ShiftPeft(PeftVariant):
    """e' = norm(e + s): phi_g and phi_k are two shifts; the text side is the zero-shot classifier."""

    def __init__(self, clip, classnames, template, scale: float) -> None:
        super().__init__()
        self.logit_scale = float(clip.logit_scale)
        self.register_buffer("text", clip.zero_shot_text(classnames, template).to(clip.device), persistent=False)
        self.phi_g = Shift(self.text.shape[1], scale)
        self.phi_k = Shift(self.text.shape[1], scale)

    @classmethod
    def from_config(cls, clip, classnames, template, options: ShiftConfig, seed: int) -> ShiftPeft:
        return cls(clip, classnames, template, options.scale)

    def branch_embedding(self, branch, x):
        return F.normalize(x + branch.shift, dim=-1)

    def class_embeddings(self, branch):
        return self.text


# ------------------------------------------------------------------------------ the toy method
class CountingConfig(MethodConfig):
    """Personalize the private branch only, every other round."""

    every: int = knob(2, "personalize in every this-many-th personalization round", role="training", ge=1)


class Counting(Method):
    """Plain CE in Stage 1; personalization trains phi_k alone with CE on l_P and counts its rounds
    in a private tensor (kept beside phi_k, never sent)."""

    personal_phase = True

    def __init__(self, cfg, class_counts=None) -> None:
        super().__init__(cfg, class_counts)
        self.rounds = 0

    def plan(self) -> RoundPlan:
        cfg = self.cfg
        base = standard_plan(cfg.train.rounds, cfg.personalize.rounds, cfg.eval_every)
        # its own plan: every personalization step also evaluates PM
        return RoundPlan(
            tuple(
                Step(s.round, s.phase, s.train, s.personalize, s.gm, s.pm or s.phase == "personal") for s in base.steps
            )
        )

    def personal_logits(self, peft, x):
        return peft.private_logits(x)

    def personalize(self, peft, data, generator, first, precision) -> float:
        self.rounds += 1
        if self.rounds % self.options.every:
            return 0.0

        def loss(idx):
            return F.cross_entropy(peft.private_logits(data.features[idx]), data.labels[idx])

        return sgd_epochs(peft.private_parameters(), loss, data, 1, 8, generator, lr=0.5)

    def private_state(self):
        return {"rounds": torch.tensor(self.rounds)}

    def load_private_state(self, state):
        self.rounds = int(state["rounds"])


@pytest.fixture
def registered():
    """The one registry line of each (here: a call, undone after the test)."""
    PEFT_VARIANTS.register("shift", ShiftConfig)(ShiftPeft)
    METHODS.register("counting", CountingConfig)(Counting)
    yield
    PEFT_VARIANTS.unregister("shift")
    METHODS.unregister("counting")


RUN = {
    **SMALL_RUN,
    "peft.name": "shift",
    "method.name": "counting",
    "peft.shift.lr": 0.5,
    "train.rounds": 2,
    "personalize.rounds": 3,
    "train.min-nodes": 3,
    "data.client-test-size": 20,
    "method.counting.every": 1,
}


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    set_task_identity(monkeypatch)


def test_the_run_config_knows_their_keys_and_validates_them(registered):
    cfg = make_cfg({**RUN, "peft.shift.scale": 2.0})
    assert isinstance(cfg.peft.options, ShiftConfig) and cfg.peft.options.scale == 2.0
    assert isinstance(cfg.method.options, CountingConfig)
    assert "peft.shift.scale = 0.0" in pyproject_section()
    with pytest.raises(ValueError, match="peft.shift.scale"):
        make_cfg({**RUN, "peft.shift.scale": -1.0})
    with pytest.raises(ValueError, match=r"did you mean 'method.counting.every'"):
        make_cfg({**RUN, "method.counting.evry": 3})


def test_without_the_registry_line_they_are_unknown():
    with pytest.raises(ValueError, match="unknown PEFT variant"):
        make_cfg({"peft.name": "shift"})


def test_they_run_through_the_real_round_loop_and_a_restarted_node_keeps_its_private_state(registered, tmp_path):
    nodes = 3
    full = {**RUN, "output-dir": str(tmp_path / "full")}
    grid = DirectGrid(full, nodes, state_root=tmp_path / "full-state")
    run_server(full, grid)
    results = json.loads((only_run_dir(tmp_path / "full") / "results.json").read_text())
    # the toy method's own plan: 2 global rounds, 3 personalization rounds, each with PM
    assert [r["phase"] for r in results["rounds"]] == ["global", "global", "personal", "personal", "personal"]
    assert all("pm" in r for r in results["rounds"][2:])
    assert results["final"]["pm"]["personalized"] is True
    # the private counter counted every personalization round on every node, and never left it
    for context in grid.contexts.values():
        assert int(context.state.array_records["fedpurel.method-state"]["rounds"].numpy()) == 3
    for reply in grid.received:
        assert "rounds" not in json.dumps({k: list(v.keys()) for k, v in reply.content.metric_records.items()})
        for record in reply.content.array_records.values():
            assert set(record.keys()) == {"shift"}, "a reply carries something other than phi_g"

    # The server dies while sending round 4 (the second personalization round); every node restarts
    # with an empty memory and a new id, and keeps its state folder.
    cut = {**RUN, "output-dir": str(tmp_path / "cut")}
    grid = DirectGrid(cut, nodes, kill_at_round=4, state_root=tmp_path / "cut-state")
    with pytest.raises(Killed):
        run_server(cut, grid)
    run_dir = only_run_dir(tmp_path / "cut")
    resumed = {**cut, "resume-from": str(run_dir)}
    fresh = DirectGrid(resumed, nodes, state_root=tmp_path / "cut-state", node_id=lambda i: 500 - i)
    run_server(resumed, fresh)
    for context in fresh.contexts.values():
        assert int(context.state.array_records["fedpurel.method-state"]["rounds"].numpy()) == 3
    restored = [
        json.loads(json.dumps(dict(r.content.metric_records["metrics"])))
        for r in fresh.received
        if r.metadata.message_type == "train.personalize"
    ]
    assert sum(r["restored"] for r in restored) == nodes, "every restarted node restores its phi_k once"
    again = json.loads((run_dir / "results.json").read_text())
    assert again["final"]["pm"] == results["final"]["pm"]
    expected = load_file(str(only_run_dir(tmp_path / "full") / "phi_g.safetensors"))
    assert torch.equal(load_file(str(run_dir / "phi_g.safetensors"))["shift"], expected["shift"])
