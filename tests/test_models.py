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
    return dataclasses.replace(
        mnist, pretrain=mnist.pretrain.subset(idx), test=mnist.test.subset(tidx)
    )


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
    for text in ["X X X X digit seven.", "an image of the handwritten number seven.",
                 "a low resolution photo of a digit seven."]:
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
    clip = create_clip(TINY, "embedded", cache_dir=str(cache), device="cpu",
                       pretrain_dataset=quick_bundle, pretrain_epochs=QUICK_EPOCHS)
    assert clip.checkpoint == str(quick_ckpt)
    assert quick_ckpt.stat().st_mtime_ns == mtime
    # the environment variable picks the default cache directory
    monkeypatch.setenv("FEDPUREL_CACHE", str(cache))
    assert create_clip(TINY, device="cpu", pretrain_dataset=quick_bundle,
                       pretrain_epochs=QUICK_EPOCHS).checkpoint == str(quick_ckpt)


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
    clip = create_clip(TINY, "embedded", cache_dir=str(tmp_path), device="cpu",
                       pretrain_dataset=mnist, seed=0)
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
    import open_clip

    from fedpurel_app.models import factory

    if factory._cached_tag_file(open_clip.get_pretrained_cfg("ViT-B-32", "openai")):
        pytest.skip("ViT-B-32 openai weights are cached on this machine")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        create_clip("ViT-B-32", pretrained="openai", device="cpu")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "openai" in msg and "HF_HUB_OFFLINE" in msg and "pretrained='/path/to/" in msg
    assert msg.count(". ") == 0, "one sentence"


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


@pytest.mark.parametrize(
    "name, transformers, timm",
    [("fedpurel-tiny", False, False), ("ViT-B-16", False, False), ("ViT-B-32", False, False),
     ("roberta-ViT-B-32", True, False), ("xlm-roberta-base-ViT-B-32", True, False), ("coca_ViT-B-32", True, False),
     ("EVA02-B-16", False, True), ("ViT-B-16-SigLIP", False, True), ("PE-Core-T-16-384", False, True),
     ("hf-hub:timm/ViT-B-16-SigLIP", True, True), ("no-such-model", True, True)],
)
def test_optional_imports_are_read_from_the_model_configs(name, transformers, timm):
    from fedpurel_app.models.factory import needs_timm, needs_transformers

    assert needs_transformers(name) is transformers
    assert needs_timm(name) is timm


def _fresh_python(code: str) -> dict[str, str]:
    """Run ``code`` in a fresh interpreter at the repository root; its ``key value`` lines."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)


def test_open_clip_is_imported_without_dynamo_and_timm_for_a_plain_clip_and_both_still_work():
    """A plain CLIP's open_clip import leaves out torch._dynamo and timm; torchvision's roi_align
    (whose module imported the stand-in) and torch.compile use the real dynamo afterwards, and timm
    imports as usual."""
    lines = _fresh_python(
        "import sys, torch\n"
        "from fedpurel_app.models.factory import import_open_clip\n"
        "open_clip = import_open_clip('fedpurel-tiny')\n"
        "print('dynamo', 'torch._dynamo' in sys.modules)\n"
        "print('timm', 'timm' in sys.modules, open_clip.timm_model.timm is None)\n"
        "import torchvision\n"
        "ra = sys.modules['torchvision.ops.roi_align']\n"
        "print('supported', ra.is_compile_supported('cpu'), 'torch._dynamo' in sys.modules)\n"
        "boxes = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])\n"
        "print('roi', tuple(torchvision.ops.roi_align(torch.ones(1, 2, 8, 8), boxes, output_size=2).shape))\n"
        "f = torch.compile(lambda x: x * 2, backend='eager')\n"
        "print('compiled', f(torch.ones(3)).tolist())\n"
        "import timm\n"
        "print('timm-after', hasattr(timm, 'create_model'))\n"
    )
    assert lines == {"dynamo": "False", "timm": "False True", "supported": "True True", "roi": "(1, 2, 2, 2)",
                     "compiled": "[2.0, 2.0, 2.0]", "timm-after": "True"}


def test_a_module_wanting_more_of_dynamo_than_the_stand_in_is_imported_with_the_real_one(tmp_path):
    (tmp_path / "wants_dynamo.py").write_text("from torch._dynamo.utils import counters\n")
    lines = _fresh_python(
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from fedpurel_app.models.factory import _import_deferring_dynamo\n"
        "module = _import_deferring_dynamo('wants_dynamo')\n"
        "print('real', type(module.counters).__name__, type(sys.modules['torch._dynamo']).__name__)\n"
        "import torch._dynamo\n"
        "print('compile', hasattr(torch._dynamo, 'optimize'))\n"
    )
    assert lines == {"real": "defaultdict module", "compile": "True"}


def test_a_checkpoint_folder_imports_open_clip_in_full_whatever_model_name_says(tmp_path):
    """The folder's own config defines the model (it may need timm or transformers), so the
    model name given beside it must not decide what open_clip is imported without."""
    (tmp_path / "open_clip_config.json").write_text("{}")
    lines = _fresh_python(
        "import sys\n"
        "from fedpurel_app.models.factory import ModelLoadError, create_clip\n"
        "try:\n"
        f"    create_clip('fedpurel-tiny', {str(tmp_path)!r}, device='cpu')\n"
        "except ModelLoadError as err:\n"
        "    print('refused', 'no open_clip_model.safetensors' in str(err))\n"
        "print('timm', sys.modules['open_clip'].timm_model.timm is not None)\n"
    )
    assert lines == {"refused": "True", "timm": "True"}


def test_a_timm_model_gets_timm_and_dynamo_stays_real_when_already_imported():
    lines = _fresh_python(
        "import sys, torch, torch._dynamo\n"
        "from fedpurel_app.models.factory import import_open_clip\n"
        "open_clip = import_open_clip('PE-Core-T-16-384')\n"
        "print('timm', open_clip.timm_model.timm is not None)\n"
        "model = open_clip.create_model('PE-Core-T-16-384')\n"
        "print('built', type(model.visual).__name__)\n"
        "print('dynamo', sys.modules['torchvision.ops.roi_align'].is_compile_supported.__module__)\n"
    )
    assert lines == {"timm": "True", "built": "TimmModel", "dynamo": "torch._dynamo.utils"}


def test_a_plain_clip_is_built_without_importing_transformers_and_lora_still_works():
    """A fresh process (a ClientApp message in deployment) builds the default model without
    transformers' import; peft (LoRA) imports it afterwards as usual."""
    lines = _fresh_python(
        "import sys\n"
        "from fedpurel_app import task\n"
        "from fedpurel_app.config import parse_run_config\n"
        "task.build_model(parse_run_config({}))\n"
        "print('after-prompt', 'transformers' in sys.modules)\n"
        "peft = task.build_model(parse_run_config({'peft': 'lora'}))\n"
        "print('after-lora', 'transformers' in sys.modules, len(peft.global_state()))\n"
    )
    assert lines["after-prompt"] == "False"
    imported, tensors = lines["after-lora"].split()
    assert imported == "True" and int(tensors) > 0
