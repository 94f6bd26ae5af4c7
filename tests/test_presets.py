"""Presets under configs/ are valid run configs; `fedpurel overrides` merges them with overrides
and refuses unknown keys."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import unflatten_dict

from fedpurel_app.config import known_keys, parse_run_config
from fedpurel_cli import overrides

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "configs").glob("*.toml"))
#: Presets of the paper's protocol (ViT-B/16, 100 rounds); the others are ``embedded-*``.
PAPER_PRESETS = [p for p in PRESETS if not p.stem.startswith("embedded-")]


def fedpurel(*args: str) -> subprocess.CompletedProcess:
    """The `fedpurel` command, as scripts/run.sh calls it."""
    return subprocess.run([sys.executable, "-m", "fedpurel_cli.main", *args], capture_output=True, text=True, cwd=REPO)


def test_there_are_presets_for_every_paper_dataset():
    names = {p.stem for p in PRESETS}
    assert {"cifar100-lt-prompt", "cifar10-lt-prompt", "imagenet-lt-prompt", "places-lt-prompt", "reference"} <= names


@pytest.mark.parametrize("preset", PAPER_PRESETS, ids=lambda p: p.stem)
def test_preset_is_a_valid_run_config(preset):
    merged = overrides.merge([str(preset)])
    assert set(merged) <= set(known_keys()), f"{preset.name} sets keys the run config does not define"
    overrides.check_keys(merged, overrides.known_keys())
    cfg = parse_run_config(unflatten_dict(merged))
    assert cfg.model.name == "ViT-B-16" and cfg.model.pretrained == "openai"
    assert (cfg.train.rounds, cfg.train.fraction, cfg.data.dirichlet_alpha, cfg.data.imbalance_factor) == (
        100,
        0.4,
        1.0,
        100.0,
    )
    # What the preset sets is what the run gets.
    flat = cfg.to_flower()
    assert {key: flat[key] for key in merged} == merged
    assert preset.stem in ("reference", f"{cfg.data.name}-{cfg.peft.name}"), "the name says dataset and variant"


def test_embedded_dp_preset_is_the_embedded_default_with_dp_on():
    merged = overrides.merge([str(REPO / "configs" / "embedded-dp.toml")])
    overrides.check_keys(merged, overrides.known_keys())
    cfg = parse_run_config(unflatten_dict(merged))
    default = parse_run_config({})
    assert cfg.dp.enabled and cfg.dp.noise_multiplier > 0 and cfg.dp.clipping_norm > 0
    assert all(key.startswith("dp.") for key in merged), "only DP keys differ from the embedded default"
    assert (cfg.data, cfg.model, cfg.train, cfg.method) == (default.data, default.model, default.train, default.method)


def test_reference_preset_uses_the_reference_code_choices():
    cfg = parse_run_config(tomllib.loads((REPO / "configs" / "reference.toml").read_text()))
    assert cfg.method.name == "fedpurel"
    assert cfg.method.options.lam == 0.99 and cfg.method.options.schedule == "interleaved"
    assert cfg.method.fedpurel_kl.lam == 0.99 and cfg.method.fedpurel_kl.schedule == "interleaved"
    assert cfg.peft.lora.rslora is True


def test_overrides_merge_a_preset_with_later_pairs_winning(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text(
        'peft.prompt.lr = 0.5\npeft.prompt.ctx-init = "a photo of a"\n[train]\nall-clients-first-round = true\n'
    )  # dotted keys and a table: both read flat
    merged = overrides.merge([str(preset), "peft.prompt.lr=0.1 seed=2 method.name='fedpurel-kl'"])
    assert merged == {
        "peft.prompt.lr": 0.1,
        "peft.prompt.ctx-init": "a photo of a",
        "train.all-clients-first-round": True,
        "seed": 2,
        "method.name": "fedpurel-kl",
    }
    text = overrides.to_run_config(merged)
    assert "peft.prompt.ctx-init='a photo of a'" in text and "train.all-clients-first-round=true" in text
    assert overrides.merge([text]) == merged, "the string flwr receives parses back to the same values"
    cfg = parse_run_config(unflatten_dict(merged))
    assert (cfg.peft.options.lr, cfg.seed, cfg.method.name) == (0.1, 2, "fedpurel-kl")


def test_a_later_value_wins_also_within_one_string():
    assert overrides.merge(["seed=1 peft.prompt.lr=0.5 seed=2"]) == {"seed": 2, "peft.prompt.lr": 0.5}


def test_the_overrides_command_prints_the_merged_run_config():
    out = fedpurel("overrides", "configs/reference.toml", "seed=3 train.rounds=2")
    assert out.returncode == 0, out.stderr
    merged = overrides.merge([out.stdout.strip()])
    assert merged["seed"] == 3 and merged["train.rounds"] == 2 and merged["method.fedpurel.lam"] == 0.99
    parse_run_config(unflatten_dict(merged))


@pytest.mark.parametrize(
    "arg, message",
    [
        ("train.rounds=abc", "'train.rounds=abc': the value is not a TOML value"),
        ("seed", "'seed' is neither key=value nor a .toml preset"),
        ("seed=1 oops", "'oops' is neither key=value nor a .toml preset"),
        ("configs/no-such-preset.toml", "cannot read the preset configs/no-such-preset.toml"),
        ("train.roundz=3", "unknown run-config key 'train.roundz' (did you mean 'train.rounds'?)"),
        ("lr=0.1", "unknown run-config key 'lr' (did you mean 'peft.prompt.lr'?)"),
    ],
)
def test_a_bad_override_is_one_clear_message_without_a_traceback(arg, message):
    with pytest.raises(overrides.OverrideError) as err:
        overrides.check_keys(overrides.merge([arg]), overrides.known_keys())
    assert message in str(err.value)
    out = fedpurel("overrides", arg)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.startswith("fedpurel: ") and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_keys_overrides_checks_are_the_run_configs():
    assert overrides.known_keys() == known_keys()


def test_an_invalid_preset_file_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("train.rounds = = 1\n")
    with pytest.raises(overrides.OverrideError, match=f"the preset {bad} is not valid TOML"):
        overrides.merge([str(bad)])


def test_prepare_finds_a_shifted_datasets_clip_under_its_backbone(tmp_path):
    """`fedpurel prepare` (scripts/run.sh's first step) for the default, blurred dataset uses the
    CLIP pretrained on its backbone (mnist-animals): with that checkpoint cached it pretrains
    nothing and succeeds, on a cache that holds no file named for the blurred dataset."""
    import shutil

    from fedpurel_app.data.client import BACKBONE_SEED, dataset
    from fedpurel_app.models.pretrain import ensure_embedded_checkpoint

    cached = ensure_embedded_checkpoint("fedpurel-tiny", dataset("mnist-animals", ""), seed=BACKBONE_SEED)
    shutil.copy(cached, tmp_path / cached.name)
    done = fedpurel("prepare", "data.name='mnist-animals-blur'", f"model.cache-dir='{tmp_path}'")
    assert done.returncode == 0, done.stderr
    assert "pretraining" not in done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [cached.name]
