"""The round plan (fedpurel_app/plan.py): the steps a method declares and the ServerApp executes."""

import pytest

from fedpurel_app.methods.base import build_method
from fedpurel_app.plan import RoundPlan, Step, due, standard_plan
from fedpurel_app.registry import METHODS
from tests.conftest import make_cfg


def shape(plan: RoundPlan) -> list[tuple]:
    return [(s.round, s.phase, s.train, s.personalize, s.gm, s.pm) for s in plan.steps]


def test_post_hoc_personalization_after_stage1():
    plan = standard_plan(3, 2)
    assert shape(plan) == [
        (0, "zero-shot", False, "", True, True),
        (1, "global", True, "", True, False),
        (2, "global", True, "", True, False),
        (3, "global", True, "", True, False),
        (4, "personal", False, "all", False, True),
        (5, "personal", False, "all", False, True),
    ]
    assert plan.total_rounds == 5


def test_interleaved_personalizes_the_sampled_clients_and_evaluates_pm_with_gm():
    plan = standard_plan(3, 0, interleaved=True)
    assert shape(plan)[1:] == [(r, "global", True, "sampled", True, True) for r in (1, 2, 3)]
    assert plan.total_rounds == 3 and not any(s.phase in ("personal", "final") for s in plan.steps)


def test_eval_every_evaluates_every_kth_step_and_always_the_last():
    plan = standard_plan(5, 3, eval_every=2)
    assert [s.round for s in plan.steps if s.gm] == [0, 2, 4, 5]
    assert [s.round for s in plan.steps if s.pm] == [0, 7, 8], "personal steps 2 and 3 (the last) of 3"
    # every step still trains / personalizes
    assert [s.round for s in plan.steps if s.train] == [1, 2, 3, 4, 5]
    assert [s.round for s in plan.steps if s.personalize == "all"] == [6, 7, 8]
    longer = standard_plan(4, 0, eval_every=10)
    assert [s.round for s in longer.steps if s.gm] == [0, 4]


def test_a_plan_without_pm_steps_ends_with_a_final_pm_evaluation():
    plan = standard_plan(3)
    assert shape(plan)[-1] == (3, "final", False, "", False, True)
    assert sum(s.pm for s in plan.steps) == 2 and plan.total_rounds == 3


def test_zero_shot_is_the_zero_shot_step_alone():
    plan = standard_plan(0)
    assert shape(plan) == [(0, "zero-shot", False, "", True, True)]
    assert plan.total_rounds == 0


def test_due():
    assert [i for i in range(1, 8) if due(i, 7, 3)] == [3, 6, 7]
    assert [i for i in range(1, 4) if due(i, 3, 1)] == [1, 2, 3]


def test_a_plan_starts_with_zero_shot_and_never_goes_back():
    with pytest.raises(ValueError, match="zero-shot"):
        RoundPlan(())
    with pytest.raises(ValueError, match="zero-shot"):
        RoundPlan((Step(1, "global", train=True),))
    with pytest.raises(ValueError, match="must not decrease"):
        RoundPlan((Step(0, "zero-shot"), Step(2, "global"), Step(1, "global")))


def test_describe_has_one_line_per_run_of_similar_steps():
    text = standard_plan(30, 5, eval_every=5).describe()
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("round 0 ") and "zero-shot" in lines[0]
    assert "GM evaluation" in lines[0] and "PM evaluation" in lines[0]
    assert lines[1].startswith("rounds 1-30 ") and "global" in lines[1]
    assert "train the sampled clients, aggregate phi_g" in lines[1] and "GM evaluation (6 of 30 steps)" in lines[1]
    assert "PM" not in lines[1]
    assert lines[2].startswith("rounds 31-35 ") and "personalize all clients" in lines[2]
    assert "PM evaluation (1 of 5 steps)" in lines[2]

    interleaved = standard_plan(3, 0, interleaved=True).describe().splitlines()
    assert len(interleaved) == 2 and "personalize the sampled clients" in interleaved[1]
    assert interleaved[1].endswith("GM evaluation; PM evaluation"), "every step evaluates both"
    final = standard_plan(3).describe().splitlines()
    assert final[-1].startswith("round 3 ") and "final" in final[-1] and final[-1].endswith("PM evaluation")
    assert standard_plan(0).describe().count("\n") == 0


def test_every_registered_method_declares_a_valid_plan():
    flat = {"train.rounds": 3, "personalize.rounds": 2, "eval-every": 1}
    plans = {name: build_method(make_cfg({**flat, "method.name": name})).plan() for name in METHODS.names()}
    for name, plan in plans.items():
        assert plan.steps[0].phase == "zero-shot", name
        assert any(s.pm for s in plan.steps[1:]) or name == "zero-shot", f"{name} never evaluates PM"
    assert shape(plans["zero-shot"]) == shape(standard_plan(0))
    assert shape(plans["promptfl"]) == shape(standard_plan(3))
    assert shape(plans["fedpurel"]) == shape(standard_plan(3, 2))
    assert shape(plans["pft"]) == shape(standard_plan(3, 2))


def test_fedpurel_schedule_selects_post_or_interleaved():
    post = build_method(make_cfg({"train.rounds": 4, "personalize.rounds": 3, "eval-every": 2})).plan()
    assert shape(post) == shape(standard_plan(4, 3, eval_every=2))
    interleaved = build_method(
        make_cfg(
            {"train.rounds": 4, "personalize.rounds": 3, "eval-every": 2, "method.fedpurel.schedule": "interleaved"}
        )
    ).plan()
    assert shape(interleaved) == shape(standard_plan(4, 0, eval_every=2, interleaved=True))
    kl = build_method(
        make_cfg({"method.name": "fedpurel-kl", "train.rounds": 2, "method.fedpurel-kl.schedule": "interleaved"})
    ).plan()
    assert all(s.personalize == "sampled" for s in kl.steps[1:])
