"""The adapter and LoRA variants end to end: `scripts/run.sh` -> `flwr run .` in Ray simulation.

One Stage-1 round and one personalization round on 4 SuperNodes each.
"""

import pytest

from tests.test_end_to_end import flower_processes, only_results, run_app

ONE_ROUND = "train.rounds=1 personalize.rounds=1 train.local-epochs=1 data.client-test-size=40"


@pytest.mark.parametrize("variant", ["adapter", "lora"])
def test_variant_runs_one_round_and_writes_complete_results(tmp_path, variant):
    proc, out = run_app(tmp_path, f"peft.name='{variant}' {ONE_ROUND}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = only_results(out)
    assert results["config"]["peft.name"] == variant and results["config"]["train.rounds"] == 1
    for gm in (results["zero_shot"]["gm"], results["final"]["gm"]):
        for key in ("all", "many", "medium", "few", "balancedness"):
            assert 0.0 <= gm[key] <= 1.0
        assert len(gm["per_class"]) == 20
    pm = results["final"]["pm"]
    assert 0.0 <= pm["all"] <= 1.0 and pm["personalized"] and pm["num_clients"] == 4
    assert [(r["round"], r["phase"]) for r in results["rounds"]] == [(1, "global"), (2, "personal")]
    train = results["rounds"][0]["train"]
    assert train["clients"] == 4 and 0.0 <= train["conflict-rate"] <= 1.0
    assert flower_processes(tmp_path / "flwr-home") == [], "processes left running"
