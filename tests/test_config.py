"""The run config: pyproject defaults are valid and complete; mistakes give one clear message."""

import tomllib
from pathlib import Path

import pytest

from fedpurel_app.config import ConfigError, RunConfig, parse_run_config

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pyproject_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_every_knob_with_the_model_default():
    config = pyproject_config()
    assert set(config) == {name.replace("_", "-") for name in RunConfig.model_fields}
    parsed = parse_run_config(config)
    assert parsed == RunConfig(), "pyproject defaults and RunConfig defaults disagree"


def test_overrides_are_applied():
    cfg = parse_run_config({**pyproject_config(), "method": "promptfl", "lr": 0.5, "seed": 3})
    assert (cfg.method, cfg.lr, cfg.seed) == ("promptfl", 0.5, 3)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"lr": -1.0}, "key 'lr': value -1.0"),
        ({"method": "fedpurel2"}, "unknown method"),
        ({"fraction-train": 1.5}, "key 'fraction-train'"),
        ({"lam": 2.0}, "key 'lam'"),
        ({"num-rounds": "ten"}, "key 'num-rounds'"),
        ({"device": "tpu"}, "key 'device'"),
        ({"lrr": 0.1}, "unknown key 'lrr' (did you mean 'lr'?)"),
        ({"tau-min": 5.0, "tau-max": 1.0}, "tau-min (5.0) must be smaller than tau-max (1.0)"),
    ],
)
def test_bad_values_name_the_key_value_and_range(override, expected):
    with pytest.raises(ConfigError) as err:
        parse_run_config({**pyproject_config(), **override})
    message = str(err.value)
    assert expected in message
    assert "Traceback" not in message


def test_all_problems_are_listed_at_once():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"lr": 0.0, "batch-size": 0, "granularity": "row"})
    message = str(err.value)
    for key in ("'lr'", "'batch-size'", "'granularity'"):
        assert key in message


def test_relative_output_dir_resolves_under_the_app_dir(tmp_path):
    cfg = parse_run_config({"output-dir": "runs"})
    assert cfg.resolved_output_dir(tmp_path) == (tmp_path / "runs").resolve()
    absolute = parse_run_config({"output-dir": str(tmp_path / "abs")})
    assert absolute.resolved_output_dir(Path("/elsewhere")) == tmp_path / "abs"


def test_public_api_is_at_the_package_top_level():
    import torch

    import fedpurel_app

    logits = torch.tensor([[2.0, 0.0, -1.0]])
    tau = fedpurel_app.solve_temperature(logits, torch.tensor([0.5]))
    assert tau.shape == (1,)
    loss = fedpurel_app.temperature_aligned_kl(logits, logits.flip(-1), aligned=True)
    assert loss.ndim == 0 and loss > 0
    (g,) = fedpurel_app.purify_gradients([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])], granularity="tensor")
    torch.testing.assert_close(g, torch.tensor([0.5, 0.5]))


def test_dataset_and_peft_names_are_checked_against_the_registries():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"dataset": "cifar1000", "peft": "bitfit"})
    message = str(err.value)
    assert "key 'dataset'" in message and "'mnist'" in message
    assert "key 'peft'" in message and "'prompt'" in message
