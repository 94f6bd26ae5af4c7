"""The run config: pyproject defaults are the models' and complete; mistakes give one clear message."""

import json
import tomllib
from pathlib import Path

import pytest

from fedpurel_app.config import (
    ConfigError,
    RunConfig,
    default_run_config,
    fingerprint,
    fingerprint_diff,
    fingerprint_fields,
    known_keys,
    parse_run_config,
    pyproject_section,
    schema_items,
)
from fedpurel_cli.main import config_section
from tests.conftest import make_cfg

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pyproject_config() -> dict:
    """``[tool.flwr.app.config]`` as TOML reads it: dotted keys become nested tables."""
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_section_is_written_from_the_config_models():
    assert config_section(PYPROJECT.read_text()) == pyproject_section(), "run `fedpurel config --write`"


def test_pyproject_lists_every_knob_with_the_model_default():
    from fedpurel_app.config import flat_items

    flat = dict(flat_items(pyproject_config()))
    assert tuple(flat) == known_keys()
    parsed = parse_run_config(pyproject_config())
    assert isinstance(parsed, RunConfig)
    assert parsed.to_flower() == default_run_config().to_flower() == flat
    assert {key: default for key, default, *_ in schema_items()} == flat


def test_every_knob_is_documented_with_a_role():
    for key, _default, doc, role in schema_items():
        assert doc.strip(), f"{key} has no documentation"
        assert role in ("identity", "training", "operational"), key


def test_overrides_are_applied():
    cfg = make_cfg({"method.name": "promptfl", "peft.prompt.lr": 0.5, "seed": 3, "train.rounds": 7})
    assert (cfg.method.name, cfg.peft.options.lr, cfg.seed, cfg.train.rounds) == ("promptfl", 0.5, 3, 7)
    assert cfg.peft.options is cfg.peft.prompt
    lora = make_cfg(
        {"peft.name": "lora", "peft.lora.rank": 4, "method.name": "fedpurel-kl", "method.fedpurel-kl.lam": 0.5}
    )
    assert lora.peft.options.rank == 4 and lora.method.options.lam == 0.5
    assert lora.method.options is lora.method.fedpurel_kl


def test_flower_flat_mapping_round_trips():
    cfg = make_cfg({"peft.name": "adapter", "peft.adapter.init": "random", "data.n-max": 40, "tkl.tol": 0.01})
    flat = cfg.to_flower()
    assert flat["peft.adapter.init"] == "random" and flat["data.n-max"] == 40
    top = {"seed", "eval-every", "output-dir", "round-timeout", "resume-from"}
    assert all("." in key or key in top for key in flat)
    assert make_cfg(flat) == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"peft.prompt.lr": -1.0}, "key 'peft.prompt.lr': value -1.0 is invalid: input should be greater than 0"),
        ({"method.name": "fedpurel2"}, "unknown method"),
        ({"train.fraction": 1.5}, "key 'train.fraction'"),
        ({"method.fedpurel.lam": 2.0}, "key 'method.fedpurel.lam'"),
        ({"train.rounds": "ten"}, "key 'train.rounds'"),
        ({"model.device": "tpu"}, "key 'model.device'"),
        ({"train.roundz": 3}, "unknown key 'train.roundz' (did you mean 'train.rounds'?)"),
        ({"lr": 0.1}, "unknown key 'lr' (did you mean 'peft.prompt.lr'?)"),
        ({"tkl.tau-min": 30.0}, "tkl.tau-min (30.0) must be smaller than tkl.tau-max (20.0)"),
        ({"data.few-threshold": 50.0}, "data.few-threshold (50.0) must not exceed data.many-threshold (40.0)"),
    ],
)
def test_bad_values_name_the_key_value_and_range(override, expected):
    with pytest.raises(ConfigError) as err:
        make_cfg(override)
    message = str(err.value)
    assert expected in message
    assert "Traceback" not in message
    assert isinstance(err.value, ValueError)


def test_all_problems_are_listed_at_once():
    with pytest.raises(ConfigError) as err:
        make_cfg({"peft.prompt.lr": 0.0, "train.batch-size": 0, "method.fedpurel.granularity": "row"})
    message = str(err.value)
    for key in ("'peft.prompt.lr'", "'train.batch-size'", "'method.fedpurel.granularity'"):
        assert key in message
    assert len([line for line in message.splitlines() if line.startswith("  - ")]) == 3


@pytest.mark.parametrize(
    "override",
    [
        {"train.rounds": True},
        {"peft.prompt.lr": True},
        {"tkl.tau-max": False},
        {"model.feature-cache": 1},
        {"train.all-clients-first-round": "true"},
        {"data.n-max": 40.0},
    ],
)
def test_types_are_strict(override):
    """A TOML ``true`` is no number, a ``1`` is no bool, a float is no count."""
    (key,) = override
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        make_cfg(override)


def test_an_int_is_accepted_for_a_float_knob():
    cfg = make_cfg({"peft.prompt.lr": 1, "data.imbalance-factor": 10})
    assert cfg.peft.options.lr == 1.0 and cfg.data.imbalance_factor == 10.0


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
    assert fedpurel_app.parse_run_config is parse_run_config


def test_config_module_imports_without_torch_and_parses_without_flower():
    """Importing the schema module pulls in neither torch nor Flower; parsing (which imports the
    registered parts, and with them torch) still never needs Flower."""
    import subprocess
    import sys

    code = (
        "import sys; import fedpurel_app.config as c; "
        "early = [m for m in ('torch', 'flwr') if m in sys.modules]; "
        "c.parse_run_config({}); c.pyproject_section(); "
        "late = [m for m in ('flwr',) if m in sys.modules]; print(early, late); sys.exit(1 if early or late else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PYPROJECT.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dataset_and_peft_names_are_checked_against_the_registries():
    with pytest.raises(ConfigError) as err:
        make_cfg({"data.name": "cifar1000", "peft.name": "bitfit"})
    message = str(err.value)
    assert "key 'data.name'" in message and "'mnist'" in message
    assert "key 'peft.name'" in message and "'prompt'" in message


# ------------------------------------------------------------------------------- fingerprints


def test_state_fingerprint_changes_with_an_identity_field_and_ignores_training_fields():
    base = make_cfg()
    key = fingerprint(base, "state")["key"]
    assert fingerprint(make_cfg(), "state")["key"] == key, "stable across parses"
    for identity in (
        {"peft.prompt.n-ctx": 8},
        {"model.name": "other"},
        {"data.name": "mnist"},
        {"seed": 1},
        {"peft.name": "adapter"},
        {"method.name": "promptfl"},
        {"data.dirichlet-alpha": 0.5},
    ):
        assert fingerprint(make_cfg(identity), "state")["key"] != key, identity
    for training in (
        {"peft.prompt.lr": 0.5},
        {"train.rounds": 3},
        {"personalize.epochs": 1},
        {"tkl.tol": 0.01},
        {"model.device": "cpu"},
        {"output-dir": "elsewhere"},
        {"method.fedpurel.lam": 0.5},
        {"data.many-threshold": 50.0},
    ):
        assert fingerprint(make_cfg(training), "state")["key"] == key, training
    # Another variant's knobs never matter while it is not selected.
    assert fingerprint(make_cfg({"peft.lora.rank": 2}), "state")["key"] == key


def test_fingerprint_extra_fields_and_scopes():
    cfg = make_cfg()
    node0 = fingerprint(cfg, "state", partition_id=0, num_partitions=3)
    assert node0 == fingerprint(cfg, "state", num_partitions=3, partition_id=0)
    assert node0["key"] != fingerprint(cfg, "state", partition_id=1, num_partitions=3)["key"]
    fields = json.loads(node0["fields"])
    assert fields["partition_id"] == 0 and fields["model.name"] == "fedpurel-tiny"
    # The checkpoint covers the training knobs too; the features cover only data and model.
    assert fingerprint(make_cfg({"train.rounds": 3}), "checkpoint")["key"] != fingerprint(cfg, "checkpoint")["key"]
    assert fingerprint(make_cfg({"output-dir": "x"}), "checkpoint")["key"] == fingerprint(cfg, "checkpoint")["key"]
    assert fingerprint(make_cfg({"peft.prompt.n-ctx": 8}), "features") == fingerprint(cfg, "features")
    assert set(fingerprint_fields(cfg, "features")) <= {"seed"} | {
        k for k in known_keys() if k.split(".")[0] in ("data", "model")
    }


def test_fingerprint_diff_names_the_changed_keys():
    a = fingerprint(make_cfg(), "state")["fields"]
    b = fingerprint(make_cfg({"peft.prompt.n-ctx": 8}), "state")["fields"]
    assert fingerprint_diff(a, b) == ["peft.prompt.n-ctx: 4 -> 8"]
    assert fingerprint_diff(a, a) == []
    assert fingerprint_diff("not json", b) == []
