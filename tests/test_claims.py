"""bench/claims.py: the verdicts of the paper's claims from runs, on fabricated runs with known differences."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import claims  # noqa: E402


def run(method: str, seed: int, gm_all: float, few: float, pm_all: float | None = None) -> dict:
    gm = {"all": gm_all, "many": 0.6, "medium": 0.5, "few": few, "balancedness": 0.2}
    out = {
        "config": {"method.name": method, "seed": seed, "peft.name": "prompt"},
        "method": {"name": method},
        "zero_shot": {"gm": {"all": 0.6, "many": 0.55, "medium": 0.5, "few": 0.7, "balancedness": 0.1}},
        "final": {"gm": gm},
        "rounds": [{"phase": "global", "gm": {"all": gm_all + 0.01 * (r % 2)}} for r in range(12)],
    }
    if pm_all is not None:
        out["final"]["pm"] = {"all": pm_all, "many": 0.7, "medium": 0.6, "few": 0.5}
    return out


def test_paired_differences_and_their_verdicts():
    runs = claims.by_seed(
        [run("fedpurel", s, 0.66 + 0.01 * s, 0.69, 0.75) for s in range(3)]
        + [run("promptfl", s, 0.65, 0.62) for s in range(3)]
    )
    # per seed: fedpurel - promptfl GM All = 1, 2, 3 points
    diffs = claims.paired(runs, ("fedpurel", claims.gm("all")), ("promptfl", claims.gm("all")))
    assert diffs == pytest.approx([1.0, 2.0, 3.0])
    assert claims.cell(diffs) == "+2.0 ± 0.8"
    assert claims.verdict(diffs) == "holds" and claims.verdict(diffs, -1) == "fails"
    assert claims.verdict([1.0, -0.8, 0.5]) == "within spread"  # mean 0.23, std 0.74
    assert claims.verdict([]) == "not measured"
    # the stability figure: std of the alternating GM All of the last 10 rounds = 0.5 points
    assert claims.stability(runs["fedpurel"][0]) == pytest.approx(0.5)
    # decay: the 12 rounds alternate x, x + 1 point and end on x + 1 (r = 11 is odd): 0 points
    assert claims.decay(runs["fedpurel"][0]) == pytest.approx(0.0)
    declining = {"rounds": [{"phase": "global", "gm": {"all": a}} for a in (0.60, 0.74, 0.70, 0.715)]}
    assert claims.decay(declining) == pytest.approx(2.5)  # best 74 %, last 71.5 %
    rows = {row[0]: row for row in claims.claims(runs)}
    assert rows["GM All above promptfl"][2] == "holds"
    assert rows["PM above GM (FedPuReL PM All - GM All)"][1] == "+8.0 ± 0.8"
    assert rows["PM All above pft"][2] == "not measured"  # no pft runs
    near = rows["purification keeps Few near zero-shot (FedPuReL GM Few - zero-shot; - PromptFL)"]
    assert near[2].startswith("holds") and "above PromptFL: holds" in near[2]  # Few -1 point, +7 over PromptFL
