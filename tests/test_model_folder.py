"""A checkpoint folder in open_clip's layout loads through the same factory as a file or a tag."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fedpurel_app.inputs import clip_of
from fedpurel_app.models import CONFIG_DIR, ModelLoadError, create_clip


def test_a_checkpoint_folder_gives_the_same_model_as_its_file(small_cfg, tmp_path):
    reference = clip_of(small_cfg.model, small_cfg.data)
    folder = tmp_path / "my-clip"
    folder.mkdir()
    model_cfg = json.loads((CONFIG_DIR / "fedpurel-tiny.json").read_text())
    preprocess_cfg = {
        "size": model_cfg["vision_cfg"]["image_size"],
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in reference.model.state_dict().items()}
    save_file(weights, str(folder / "open_clip_model.safetensors"))

    loaded = create_clip("fedpurel-tiny", str(folder), device="cpu")
    assert loaded.checkpoint.endswith("open_clip_model.safetensors")
    tokens = reference.tokenizer(["a photo of a cat."])
    image = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_text(tokens), reference.model.encode_text(tokens))
        torch.testing.assert_close(loaded.model.encode_image(image), reference.model.encode_image(image))
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_a_folder_without_open_clip_files_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        create_clip("fedpurel-tiny", str(tmp_path), device="cpu")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no open_clip_model.safetensors"):
        create_clip("fedpurel-tiny", str(tmp_path), device="cpu")
