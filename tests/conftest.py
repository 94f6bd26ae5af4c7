"""Shared test setup: offline, single-threaded torch, a small run config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: one thread is faster than two, and immune to a busy machine.
torch.set_num_threads(1)

# A small but complete run: few clients and rounds, the embedded model and data.
SMALL_RUN = {
    "num-rounds": 2,
    "personal-rounds": 1,
    "local-epochs": 1,
    "client-test-size": 30,
}


@pytest.fixture(scope="session")
def small_cfg():
    from fedpurel_app.config import parse_run_config

    return parse_run_config(SMALL_RUN)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
