"""Tests of fedpurel_app.models: the embedded tiny CLIP, its checkpoint cache, and loading.

Offline by construction: HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import hashlib
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpurel_app.data import load_dataset
from fedpurel_app.errors import UserError
from fedpurel_app.models import (
    CONFIG_DIR,
    ModelLoadError,
    create_clip,
    encode_images,
    ensure_embedded_checkpoint,
    resolve_device,
    train_embedded_model,
    zero_shot_logits,
    zero_shot_text_features,
)
from fedpurel_app.models import pretrain as pretrain_mod
from fedpurel_app.storage import save_tensors_atomic

TINY = "fedpurel-tiny"
QUICK_EPOCHS = 2  # for tests that need a checkpoint, not a good one
PER_CLASS = 20  # pretrain images per class in the quick bundle


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", seed=0)


@pytest.fixture(scope="module")
def quick_bundle(mnist):
    """The mnist bundle with a small pretrain split (PER_CLASS per class) and a small test split."""
    lab = np.asarray(mnist.pretrain.labels)
    idx = np.concatenate([np.flatnonzero(lab == c)[:PER_CLASS] for c in range(len(mnist.classnames))])
    tlab = np.asarray(mnist.test.labels)
    tidx = np.concatenate([np.flatnonzero(tlab == c)[:5] for c in range(len(mnist.classnames))])
    return dataclasses.replace(mnist, pretrain=mnist.pretrain.subset(idx), test=mnist.test.subset(tidx))


@pytest.fixture(scope="module")
def quick_ckpt(quick_bundle, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return ensure_embedded_checkpoint(TINY, quick_bundle, cache, seed=0, epochs=QUICK_EPOCHS)


# ----------------------------------------------------------------------------- config


def test_config_ships_and_registers():
    import open_clip

    cfg_file = CONFIG_DIR / f"{TINY}.json"
    assert cfg_file.is_file()
    from fedpurel_app.models import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(TINY)
    assert cfg is not None and {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg)
    tok = open_clip.get_tokenizer(TINY)
    # a CoOp prompt and the longest caption fit with SOT and EOT (no truncation)
    for text in [
        "X X X X digit seven.",
        "an image of the handwritten number seven.",
        "a low resolution photo of a digit seven.",
    ]:
        ids = tok([text])[0]
        assert int((ids != 0).sum()) < cfg["text_cfg"]["context_length"], text


# ------------------------------------------------------------------- checkpoint + cache


def test_checkpoint_loads_through_open_clip_identically(quick_bundle, quick_ckpt):
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    in_memory = train_embedded_model(TINY, quick_bundle, seed=0, epochs=QUICK_EPOCHS)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng_state), "global RNG state leaked"

    clip = create_clip(TINY, pretrained=str(quick_ckpt), device="cpu")
    assert clip.checkpoint == str(quick_ckpt)
    assert quick_ckpt.suffix == ".safetensors"
    assert not clip.model.training
    assert all(not p.requires_grad for p in clip.model.parameters())

    loaded = clip.model.state_dict()
    for k, v in in_memory.state_dict().items():
        assert torch.equal(v, loaded[k]), k
    x = torch.stack([clip.preprocess(quick_bundle.test.pil(i)) for i in range(8)])
    tokens = clip.tokenizer([quick_bundle.template.format(c) for c in quick_bundle.classnames])
    with torch.no_grad():
        assert torch.equal(in_memory.encode_image(x), clip.model.encode_image(x))
        assert torch.equal(in_memory.encode_text(tokens), clip.model.encode_text(tokens))
    assert clip.logit_scale == pytest.approx(float(in_memory.logit_scale.detach().exp()))


def test_same_seed_same_checkpoint_other_seed_differs(quick_bundle, quick_ckpt, tmp_path):
    again = ensure_embedded_checkpoint(TINY, quick_bundle, tmp_path / "a", seed=0, epochs=QUICK_EPOCHS)
    assert again != quick_ckpt and again.name == quick_ckpt.name  # same key, other directory
    assert _sha(again) == _sha(quick_ckpt)
    other = ensure_embedded_checkpoint(TINY, quick_bundle, tmp_path / "b", seed=1, epochs=QUICK_EPOCHS)
    assert other.name != quick_ckpt.name
    assert _sha(other) != _sha(quick_ckpt)


def test_second_call_reuses_the_file(quick_bundle, quick_ckpt, monkeypatch):
    mtime = quick_ckpt.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("pretrained again although the checkpoint is cached")

    monkeypatch.setattr(pretrain_mod, "pretrain_clip", no_training)
    cache = quick_ckpt.parent
    assert ensure_embedded_checkpoint(TINY, quick_bundle, cache, seed=0, epochs=QUICK_EPOCHS) == quick_ckpt
    clip = create_clip(
        TINY,
        "embedded",
        cache_dir=str(cache),
        device="cpu",
        pretrain_dataset=quick_bundle,
        pretrain_epochs=QUICK_EPOCHS,
    )
    assert clip.checkpoint == str(quick_ckpt)
    assert quick_ckpt.stat().st_mtime_ns == mtime
    # the environment variable picks the default cache directory
    monkeypatch.setenv("FEDPUREL_CACHE", str(cache))
    assert create_clip(
        TINY, device="cpu", pretrain_dataset=quick_bundle, pretrain_epochs=QUICK_EPOCHS
    ).checkpoint == str(quick_ckpt)


def _concurrent_worker(cache: str, barrier, queue) -> None:
    """Runs in a spawned process: wait for the sibling, then ensure the same checkpoint."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    import fedpurel_app.models.pretrain as pm

    real = pm.pretrain_clip

    def counted(*a, **k):
        with open(os.path.join(cache, "trainings.log"), "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real(*a, **k)

    pm.pretrain_clip = counted
    bundle = _quick_bundle_in_child()
    barrier.wait(timeout=120)
    path = pm.ensure_embedded_checkpoint(TINY, bundle, cache, seed=3, epochs=3)
    queue.put((str(path), _sha(path)))


def _quick_bundle_in_child():
    mnist = load_dataset("mnist", seed=0)
    lab = np.asarray(mnist.pretrain.labels)
    idx = np.concatenate([np.flatnonzero(lab == c)[:PER_CLASS] for c in range(10)])
    return dataclasses.replace(mnist, pretrain=mnist.pretrain.subset(idx))


def test_two_processes_at_once_train_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (path_a, sha_a), (path_b, sha_b) = results
    assert path_a == path_b and sha_a == sha_b
    assert len((tmp_path / "trainings.log").read_text().split()) == 1, "both processes trained"
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"
    from safetensors.torch import load_file

    assert "logit_scale" in load_file(path_a)
    assert create_clip(TINY, pretrained=path_a, device="cpu").checkpoint == path_a


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch as st

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken_save)
    target = tmp_path / "x.safetensors"
    with pytest.raises(OSError):
        save_tensors_atomic({"a": torch.zeros(2)}, target, {})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- quality


def test_default_recipe_zero_shot_accuracy(mnist, tmp_path):
    """The default embedded model: zero-shot ~0.8 on the balanced mnist test set (measured
    0.83 / 0.81 / 0.83 for seeds 0 / 1 / 2): good enough to start from, far from perfect."""
    t0 = time.perf_counter()
    clip = create_clip(TINY, "embedded", cache_dir=str(tmp_path), device="cpu", pretrain_dataset=mnist, seed=0)
    seconds = time.perf_counter() - t0
    feats = encode_images(clip, mnist.test)
    assert feats.shape == (len(mnist.test), 64) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats)), atol=1e-5)
    text = zero_shot_text_features(clip, mnist.classnames, mnist.template)
    assert text.shape == (10, 64)
    logits = zero_shot_logits(clip, feats, text)
    assert torch.allclose(logits, clip.logit_scale * feats @ text.T)
    pred = logits.argmax(1).numpy()
    y = np.asarray(mnist.test.labels)
    acc = float((pred == y).mean())
    per_class = [float((pred[y == c] == c).mean()) for c in range(10)]
    print(f"zero-shot acc {acc:.3f}, per class {np.round(per_class, 2)}, create_clip {seconds:.1f}s")
    assert 0.70 <= acc <= 0.93, acc
    assert min(per_class) >= 0.4, per_class


# ----------------------------------------------------------------------------- errors


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(ModelLoadError) as e:
        create_clip("ViT-B-32", pretrained="no-such-tag", device="cpu")
    msg = str(e.value)
    assert "no-such-tag" in msg and "openai" in msg and "laion2b_s34b_b79k" in msg


def test_known_tag_offline_fails_fast_with_instructions(monkeypatch):
    """Through the public path: open_clip's own download fails at once under HF_HUB_OFFLINE=1
    (set before huggingface_hub was imported) and the error says what is missing and what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    try:
        create_clip("ViT-B-32", pretrained="openai", device="cpu")
    except ModelLoadError as e:
        err = e
    else:
        pytest.skip("ViT-B-32 openai weights are cached on this machine")
    assert time.perf_counter() - t0 < 60, "no retries: one attempt, then the message"
    msg = str(err)
    assert isinstance(err, ValueError) and isinstance(err, UserError)
    assert "openai" in msg and "ViT-B-32" in msg and "not in the local cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg and "pretrained='/path/to/" in msg
    assert msg.count(". ") == 0, "one sentence"


def test_a_failed_download_and_a_bad_cached_file_get_their_own_messages(monkeypatch):
    """What open_clip raises decides the message: a download that failed (huggingface_hub's or
    urllib's errors under open_clip's) says the weights are missing; anything else says the
    weights could not be loaded."""
    import open_clip
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_hub(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except LocalEntryNotFoundError as e:
            raise RuntimeError("Failed to download weights for tag 'openai'") from e

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_hub)
    expected = r"downloaded \(no connection to the Hugging Face Hub; HF_HUB_OFFLINE=1 makes this fail at once\)"
    with pytest.raises(ModelLoadError, match=expected):
        create_clip("ViT-B-32", pretrained="openai", device="cpu")

    def damaged(*args, **kwargs):
        raise RuntimeError("invalid header or archive is corrupted")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", damaged)
    with pytest.raises(ModelLoadError, match="could not load the open_clip weights 'openai'.*corrupted"):
        create_clip("ViT-B-32", pretrained="openai", device="cpu")


def test_missing_or_incompatible_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        create_clip(TINY, pretrained=str(tmp_path / "nope.safetensors"), device="cpu")
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"logit_scale": torch.zeros(())}, str(bad))
    with pytest.raises(ModelLoadError, match="could not load"):
        create_clip(TINY, pretrained=str(bad), device="cpu")


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="fedpurel-tiny"):
        create_clip("no-such-model", device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu-please")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{n}")
    else:
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="CUDA is not available"):
                resolve_device(name)
        with pytest.raises(ValueError, match="CUDA is not available"):
            create_clip(device="cuda")


def _fresh_python(code: str) -> dict[str, str]:
    """Run ``code`` in a fresh interpreter at the repository root; its ``key value`` lines."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)


def test_a_fresh_process_builds_a_plain_clip_and_lora_with_open_clip_imported_as_is():
    """A fresh process (a ClientApp message in deployment) builds the default model, then a LoRA
    model; open_clip is imported as it is, with its optional towers (timm, transformers) and
    the real torch._dynamo, and nothing of this package changes sys.modules."""
    lines = _fresh_python(
        "import sys\n"
        "import fedpurel_app.models\n"
        "print('eager', 'open_clip' in sys.modules)\n"
        "from fedpurel_app.config import parse_run_config\n"
        "from fedpurel_app.data.client import classes\n"
        "from fedpurel_app.inputs import clip_of\n"
        "from fedpurel_app.peft.base import build_peft\n"
        "cfg = parse_run_config({})\n"
        "build_peft(cfg, clip_of(cfg.model, cfg.data), *classes(cfg.data))\n"
        "import open_clip, torch._dynamo\n"
        "print('towers', open_clip.timm_model.timm is not None, open_clip.hf_model.transformers is not None)\n"
        "print('dynamo', hasattr(torch._dynamo, 'optimize'))\n"
        "cfg = parse_run_config({'peft': {'name': 'lora'}})\n"
        "peft = build_peft(cfg, clip_of(cfg.model, cfg.data), *classes(cfg.data))\n"
        "print('lora', type(peft).__name__, len(peft.global_state()) > 0)\n"
    )
    assert lines == {"eager": "False", "towers": "True True", "dynamo": "True", "lora": "LoraPeft True"}


def test_a_timm_tower_model_loads_from_a_local_file(tmp_path):
    """A model whose image tower is timm's (PE-Core-T-16-384) loads from a local open_clip
    checkpoint through the same path as a plain CLIP."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = open_clip.create_model("PE-Core-T-16-384")
    path = tmp_path / "pe-core-t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    clip = create_clip("PE-Core-T-16-384", pretrained=str(path), device="cpu")
    assert type(clip.model.visual).__name__ == "TimmModel"
    assert clip.checkpoint == str(path) and all(not p.requires_grad for p in clip.model.parameters())
    source.eval()
    tokens = clip.tokenizer(["a photo of a cat."])
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_text(tokens), source.encode_text(tokens))
