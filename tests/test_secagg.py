"""Stage 1 through Flower's SecAgg+ (the prototype of bench/secagg_stage1.py): our ClientApp behind
``secaggplus_mod``, one round aggregated by ``SecAggPlusWorkflow`` in a ``LegacyContext``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from secagg_stage1 import one_round  # noqa: E402

from tests.conftest import SMALL_RUN  # noqa: E402


@pytest.mark.parametrize("clipping_norm", [None, 0.01], ids=["fedavg", "dp"])
def test_the_secagg_aggregate_is_the_plain_one_within_quantization_and_the_server_holds_no_update(
    tmp_path, clipping_norm
):
    run = {**SMALL_RUN, "train.rounds": 1, "output-dir": str(tmp_path), "track.tensorboard": False}
    out = one_round(run, 3, clipping_norm)
    assert out["contributors"] == 3
    assert out["max_error"] <= out["bound"], "the n_k-weighted (or, with DP, uniform clipped) mean"
    assert out["max_error"] < 1e-3 * out["largest_update_value"]
    assert out["replies_received"] == 4 * 3, "four stages, one reply per client each"
    assert out["arrays_received"] == 0, "no reply carries an array: updates arrive masked only"
    if clipping_norm:
        assert out["weights"] == [1, 1, 1]
        assert out["update_norms"] == pytest.approx([clipping_norm] * 3, rel=1e-4)
