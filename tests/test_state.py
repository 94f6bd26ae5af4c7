"""Durable per-node private state (fedpurel_app/state.py): round trip, atomicity, permissions, refusals."""

import os
import stat
from types import SimpleNamespace

import pytest
import torch

from fedpurel_app import state as st
from fedpurel_app.state import NodeStateStore, StateError, run_state_key, state_key


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
    store = NodeStateStore(tmp_path / "node0", model="tiny", peft="prompt")
    assert store.load(st.PHI_K) is None and not store.exists(st.PHI_K)
    store.save(st.PHI_K, phi(0))
    features = {"train.features": torch.randn(7, 64), "train.labels": torch.arange(7)}
    store.save("features", features)
    # A new store on the same folder and key (a restarted SuperNode) reads both back.
    again = NodeStateStore(tmp_path / "node0", model="tiny", peft="prompt")
    assert same(again.load(st.PHI_K), phi(0))
    assert same(again.load("features"), features)
    # Overwrite replaces; views and non-contiguous tensors are saved as their values.
    base = torch.randn(4, 6)
    again.save(st.PHI_K, {"t": base.t(), "v": base[1:3]})
    loaded = again.load(st.PHI_K)
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["v"], base[1:3])
    again.remove(st.PHI_K)
    assert again.load(st.PHI_K) is None


def test_folder_and_files_are_owner_only(tmp_path):
    folder = tmp_path / "deep" / "state"
    store = NodeStateStore(folder, k=1)
    path = store.save(st.PHI_K, phi())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # An existing folder with loose permissions is tightened.
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    NodeStateStore(loose, k=1)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    assert [p.name for p in folder.iterdir()] == ["phi_k.safetensors"], "no temp file left behind"


def test_a_crash_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    store = NodeStateStore(tmp_path, k=1)
    store.save(st.PHI_K, phi(0))
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
        store.save(st.PHI_K, phi(1))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    assert (tmp_path / "phi_k.safetensors").read_bytes() == before
    assert same(store.load(st.PHI_K), phi(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi_k.safetensors"]

    # Crash between the complete temp file and the rename (e.g. killed): old file intact.
    def killed(src, dst):
        raise KeyboardInterrupt

    import fedpurel_app.storage as storage

    monkeypatch.setattr(storage.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save(st.PHI_K, phi(2))
    monkeypatch.undo()
    assert same(store.load(st.PHI_K), phi(0))
    # A temp file orphaned by a hard kill (never renamed) is never read as state.
    (tmp_path / ".phi_k.abc.tmp").write_bytes(b"partial")
    assert same(store.load(st.PHI_K), phi(0))


def test_a_file_from_another_configuration_is_refused_with_the_difference(tmp_path):
    NodeStateStore(tmp_path, model="tiny", peft="prompt", n_ctx=4).save(st.PHI_K, phi())
    other = NodeStateStore(tmp_path, model="tiny", peft="prompt", n_ctx=8)
    with pytest.raises(StateError) as err:
        other.load(st.PHI_K)
    text = str(err.value)
    assert "different configuration" in text and "n_ctx: file has 4, this run has 8" in text
    assert "phi_k.safetensors" in text and "delete" in text
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[: len(b) // 2], "damaged"),                  # truncated
        (lambda b: b"", "damaged"),                               # empty
        (lambda b: b"not a safetensors file at all", "damaged"),  # garbage
        (lambda b: b[:-4] + bytes(x ^ 0xFF for x in b[-4:]), "checksum"),  # flipped data bytes
    ],
)
def test_a_damaged_file_is_refused_with_a_clear_message(tmp_path, damage, why):
    store = NodeStateStore(tmp_path, k=1)
    path = store.save(st.PHI_K, phi())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StateError, match=why) as err:
        store.load(st.PHI_K)
    assert str(path) in str(err.value) and "delete it" in str(err.value)


def test_a_plain_safetensors_file_without_our_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    store = NodeStateStore(tmp_path, k=1)
    save_file({"x": torch.ones(2)}, str(tmp_path / "phi_k.safetensors"))
    with pytest.raises(StateError, match="not a FedPuReL state file"):
        store.load(st.PHI_K)


def test_names_cannot_escape_the_folder(tmp_path):
    store = NodeStateStore(tmp_path / "s", k=1)
    for bad in ("../phi_k", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(StateError, match="invalid state name"):
            store.save(bad, phi())
    with pytest.raises(StateError, match="dict of tensors"):
        store.save("ok", {"x": [1, 2]})
    with pytest.raises(StateError, match="state-dir is empty"):
        NodeStateStore("", k=1)


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError, match="cannot create state-dir|not a folder"):
        NodeStateStore(tmp_path / "f", k=1)


def test_state_keys_are_stable_and_tied_to_the_run_and_partition():
    assert state_key(a=1, b="x") == state_key(b="x", a=1)
    assert state_key(a=1)["key"] != state_key(a=2)["key"]
    cfg = SimpleNamespace(model="fedpurel-tiny", pretrained="embedded", peft="prompt", n_ctx=4, seed=0)
    k0 = run_state_key(cfg, 0, 3)
    assert k0 == run_state_key(cfg, 0, 3)
    assert k0["key"] != run_state_key(cfg, 1, 3)["key"]
    assert k0["key"] != run_state_key(SimpleNamespace(**{**vars(cfg), "n_ctx": 8}), 0, 3)["key"]


def test_the_real_run_config_gives_a_key(small_cfg):
    key = run_state_key(small_cfg, 2, 5)
    assert '"model":"fedpurel-tiny"' in key["fields"] and '"partition_id":2' in key["fields"]
