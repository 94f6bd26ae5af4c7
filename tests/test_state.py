"""Durable per-node private state (fedpurel_app/state.py): round trip, atomicity, permissions, refusals."""

import json
import os
import stat

import pytest
import torch

from fedpurel_app.client import PHI_K
from fedpurel_app.config import fingerprint
from fedpurel_app.errors import StateError, UserError
from fedpurel_app.state import NodeStateStore
from tests.conftest import make_cfg


def key(flat=None, partition_id=0, num_partitions=3, data_dir="") -> dict[str, str]:
    """A node's state key, as the client computes it."""
    return fingerprint(
        make_cfg(flat), "state", partition_id=partition_id, num_partitions=num_partitions, data_dir=data_dir
    )


KEY = key()


def phi(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "residual.weight": torch.randn(10, 64, generator=g),
        "residual.bias": torch.randn(10, generator=g),
        "half": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_round_trip_of_phi_k_and_named_dicts(tmp_path):
    store = NodeStateStore(tmp_path / "node0", KEY)
    assert store.load(PHI_K) is None and not store.exists(PHI_K)
    store.save(PHI_K, phi(0))
    features = {"train.features": torch.randn(7, 64), "train.labels": torch.arange(7)}
    store.save("features", features)
    # A new store on the same folder and key (a restarted SuperNode) reads both back.
    again = NodeStateStore(tmp_path / "node0", KEY)
    assert same(again.load(PHI_K), phi(0))
    assert same(again.load("features"), features)
    # Overwrite replaces; views and non-contiguous tensors are saved as their values.
    base = torch.randn(4, 6)
    again.save(PHI_K, {"t": base.t(), "v": base[1:3]})
    loaded = again.load(PHI_K)
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["v"], base[1:3])
    again.remove(PHI_K)
    assert again.load(PHI_K) is None


def test_folder_and_files_are_owner_only(tmp_path):
    folder = tmp_path / "deep" / "state"
    store = NodeStateStore(folder, KEY)
    path = store.save(PHI_K, phi())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # An existing folder with loose permissions is tightened.
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    NodeStateStore(loose, KEY)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    assert [p.name for p in folder.iterdir()] == ["phi_k.safetensors"], "no temp file left behind"


def test_a_crash_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    store = NodeStateStore(tmp_path, KEY)
    store.save(PHI_K, phi(0))
    before = (tmp_path / "phi_k.safetensors").read_bytes()

    # Crash after half of the new bytes reached the temp file (disk full).
    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def half_written(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError):
        store.save(PHI_K, phi(1))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    assert (tmp_path / "phi_k.safetensors").read_bytes() == before
    assert same(store.load(PHI_K), phi(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi_k.safetensors"]

    # Crash between the complete temp file and the rename (e.g. killed): old file intact.
    def killed(src, dst):
        raise KeyboardInterrupt

    import fedpurel_app.storage as storage

    monkeypatch.setattr(storage.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save(PHI_K, phi(2))
    monkeypatch.undo()
    assert same(store.load(PHI_K), phi(0))
    # A temp file orphaned by a hard kill (never renamed) is never read as state.
    (tmp_path / ".phi_k.abc.tmp").write_bytes(b"partial")
    assert same(store.load(PHI_K), phi(0))


def test_a_file_from_another_configuration_is_refused_with_the_difference(tmp_path):
    NodeStateStore(tmp_path, key({"peft.prompt.n-ctx": 4})).save(PHI_K, phi())
    other = NodeStateStore(tmp_path, key({"peft.prompt.n-ctx": 8}))
    with pytest.raises(StateError) as err:
        other.load(PHI_K)
    text = str(err.value)
    assert "different configuration" in text and "peft.prompt.n-ctx: 4 -> 8" in text
    assert "phi_k.safetensors" in text and "delete" in text
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)
    # Another partition of the same run is another node's state.
    with pytest.raises(StateError, match="partition_id: 0 -> 1"):
        NodeStateStore(tmp_path, key(partition_id=1)).load(PHI_K)


def test_a_training_knob_does_not_invalidate_the_state(tmp_path):
    NodeStateStore(tmp_path, KEY).save(PHI_K, phi())
    later = NodeStateStore(
        tmp_path, key({"peft.prompt.lr": 0.5, "train.rounds": 7, "personalize.epochs": 1, "output-dir": "elsewhere"})
    )
    assert same(later.load(PHI_K), phi())


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[: len(b) // 2], "damaged"),  # truncated
        (lambda b: b"", "damaged"),  # empty
        (lambda b: b"not a safetensors file at all", "damaged"),  # garbage
        (lambda b: b[:-4] + bytes(x ^ 0xFF for x in b[-4:]), "checksum"),  # flipped data bytes
    ],
)
def test_a_damaged_file_is_refused_with_a_clear_message(tmp_path, damage, why):
    store = NodeStateStore(tmp_path, KEY)
    path = store.save(PHI_K, phi())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StateError, match=why) as err:
        store.load(PHI_K)
    assert str(path) in str(err.value) and "delete it" in str(err.value)


def test_a_plain_safetensors_file_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    store = NodeStateStore(tmp_path, KEY)
    save_file({"x": torch.ones(2)}, str(tmp_path / "phi_k.safetensors"))
    with pytest.raises(StateError, match="not a FedPuReL state file"):
        store.load(PHI_K)


def test_names_cannot_escape_the_folder(tmp_path):
    store = NodeStateStore(tmp_path / "s", KEY)
    for bad in ("../phi_k", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(StateError, match="invalid state name"):
            store.save(bad, phi())
    with pytest.raises(StateError, match="dict of tensors"):
        store.save("ok", {"x": [1, 2]})
    with pytest.raises(StateError, match="state-dir is empty"):
        NodeStateStore("", KEY)


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError, match="cannot create state-dir|not a folder"):
        NodeStateStore(tmp_path / "f", KEY)


def test_state_keys_are_stable_and_tied_to_the_config_and_partition():
    assert key() == KEY, "the same config and node give the same key"
    assert key(partition_id=1)["key"] != KEY["key"]
    assert key(num_partitions=4)["key"] != KEY["key"]
    assert key(data_dir="/data/node0")["key"] != KEY["key"]
    for identity in (
        {"peft.prompt.n-ctx": 8},
        {"peft.prompt.ctx-init": ""},
        {"peft.name": "adapter"},
        {"model.pretrained": "other.safetensors"},
        {"data.name": "mnist"},
        {"seed": 1},
        {"data.n-max": 50},
        {"method.name": "promptfl"},
    ):
        assert key(identity)["key"] != KEY["key"], identity
    for training in (
        {"peft.prompt.lr": 0.5},
        {"peft.prompt.personal-lr": 0.5},
        {"train.rounds": 3},
        {"train.batch-size": 4},
        {"tkl.tau-max": 5.0},
        {"model.device": "cpu"},
        {"model.cache-dir": "/tmp/x"},
        {"round-timeout": 5.0},
        {"peft.lora.rank": 2},
    ):
        assert key(training) == KEY, training


def test_the_real_run_config_gives_a_key(small_cfg):
    state_key = fingerprint(small_cfg, "state", partition_id=2, num_partitions=5, data_dir="")
    fields = json.loads(state_key["fields"])
    assert fields["model.name"] == "fedpurel-tiny" and fields["partition_id"] == 2
    assert fields["peft.name"] == "prompt" and fields["peft.prompt.n-ctx"] == 4
    assert not any(k.startswith(("train.", "personalize.", "tkl.")) for k in fields)
