"""Presets under configs/ are valid run configs; scripts/overrides.py merges them with overrides."""

import sys
import tomllib
from pathlib import Path

import pytest

from fedpurel_app.config import parse_run_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import overrides  # noqa: E402

PRESETS = sorted((REPO / "configs").glob("*.toml"))


def test_there_are_presets_for_every_paper_dataset():
    names = {p.stem for p in PRESETS}
    assert {"cifar100-lt-prompt", "cifar10-lt-prompt", "imagenet-lt-prompt", "places-lt-prompt", "reference"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_a_valid_run_config(preset):
    defaults = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    values = tomllib.loads(preset.read_text())
    assert set(values) <= set(defaults), f"{preset.name} sets keys pyproject does not define"
    cfg = parse_run_config({**defaults, **values})
    assert cfg.model == "ViT-B-16" and cfg.pretrained == "openai"
    assert (cfg.num_rounds, cfg.fraction_train, cfg.dirichlet_alpha, cfg.imbalance_factor) == (100, 0.4, 1.0, 100.0)


def test_reference_preset_uses_the_reference_code_choices():
    cfg = tomllib.loads((REPO / "configs" / "reference.toml").read_text())
    assert cfg["lam"] == 0.99 and cfg["personalization"] == "interleaved"


def test_overrides_merge_a_preset_with_later_pairs_winning(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('lr = 0.5\nctx-init = "a photo of a"\nall-clients-first-round = true\n')
    merged = overrides.merge([str(preset), "lr=0.1 seed=2 method='fedpurel-kl'"])
    assert merged == {"lr": 0.1, "ctx-init": "a photo of a", "all-clients-first-round": True, "seed": 2, "method": "fedpurel-kl"}
    text = overrides.to_run_config(merged)
    assert "ctx-init='a photo of a'" in text and "all-clients-first-round=true" in text
    assert overrides.merge([text]) == merged, "the string flwr receives parses back to the same values"


def test_a_later_value_wins_also_within_one_string():
    assert overrides.merge(["seed=1 lr=0.5 seed=2"]) == {"seed": 2, "lr": 0.5}


@pytest.mark.parametrize(
    "arg, message",
    [("lr=abc", "'lr=abc': the value is not a TOML value"),
     ("seed", "'seed' is neither key=value nor a .toml preset"),
     ("seed=1 oops", "'oops' is neither key=value nor a .toml preset"),
     ("configs/no-such-preset.toml", "cannot read the preset configs/no-such-preset.toml")],
)
def test_a_bad_override_is_one_clear_message_without_a_traceback(arg, message):
    import subprocess

    with pytest.raises(overrides.OverrideError, match=message.replace("(", r"\(")):
        overrides.merge([arg])
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "overrides.py"), arg], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("fedpurel: ") and message in out.stderr and "Traceback" not in out.stderr


def test_an_invalid_preset_file_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1\n")
    with pytest.raises(overrides.OverrideError, match=f"the preset {bad} is not valid TOML"):
        overrides.merge([str(bad)])
