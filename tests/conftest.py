"""Shared test setup: offline, single-threaded torch, a small run config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: one thread is faster than two, and immune to a busy machine.
torch.set_num_threads(1)

# A small but complete run: few clients and rounds, the embedded model and data.
# Keys are flat and dotted, as Flower passes a run config (context.run_config).
SMALL_RUN = {
    "train.rounds": 2,
    "personalize.rounds": 1,
    "train.local-epochs": 1,
    "data.client-test-size": 30,
}


def make_cfg(flat=None):
    """A validated run config from a flat mapping of dotted keys (missing keys: defaults),
    unflattened with Flower's own ``unflatten_dict`` as the apps do."""
    from flwr.common.config import unflatten_dict

    from fedpurel_app.config import parse_run_config

    return parse_run_config(unflatten_dict(dict(flat or {})))


@pytest.fixture(scope="session")
def small_cfg():
    return make_cfg(SMALL_RUN)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
