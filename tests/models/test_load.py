"""Loading through the real library code paths, and clear errors for what cannot be loaded."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import clipheads
from clipheads.models.random_init import random_hf_clip, save_hf


@pytest.mark.parametrize("chinese", [False, True], ids=["clip", "chinese-clip"])
def test_hf_folder_round_trip(tmp_path, chinese):
    backend = random_hf_clip("tiny", chinese=chinese, seed=4)
    save_hf(backend, tmp_path)
    loaded = clipheads.load(str(tmp_path))
    assert type(loaded.model) is type(backend.model)
    assert loaded.architecture == backend.architecture
    image = Image.new("RGB", (40, 50), (200, 30, 30))
    pixels = loaded.preprocess(image)
    assert pixels.shape == (3, 32, 32)
    with torch.inference_mode():
        assert (loaded.encode_image(pixels[None]) - backend.encode_image(pixels[None])).abs().max() <= 1e-5
        texts = ["a red circle", "two blue squares"]
        assert torch.allclose(loaded.encode_text(texts), backend.encode_text(texts))


def test_protocol_shape_and_encoders(tiny_backend, pixels):
    assert (tiny_backend.n_layers, tiny_backend.n_heads, tiny_backend.head_dim) == (2, 4, 16)
    with torch.inference_mode():
        image = tiny_backend.encode_image(pixels, normalize=True)
        text = tiny_backend.encode_text(["a photo of a cat", "a dog"], normalize=True)
    assert image.shape[0] == 3 and text.shape[0] == 2 and image.shape[1] == text.shape[1]
    assert torch.allclose(image.norm(dim=-1), torch.ones(3))
    assert tiny_backend.logit_scale > 0


def test_open_clip_preprocess(tiny_backend):
    image = Image.new("RGB", (64, 48), (0, 128, 255))
    assert tiny_backend.preprocess(image).shape == (3, 32, 32)


def test_unknown_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(clipheads.ModelLoadError) as info:
        clipheads.load("nobody/no-such-clip-model")
    message = str(info.value)
    assert "\n" not in message and "nobody/no-such-clip-model" in message and "HF_HUB_OFFLINE" in message


def test_unknown_open_clip_names_fail_clearly():
    with pytest.raises(clipheads.ModelLoadError, match="unknown open_clip architecture"):
        clipheads.load("open_clip:ViT-Q-99")
    with pytest.raises(clipheads.ModelLoadError, match="neither a checkpoint file nor a pretrained tag"):
        clipheads.load("open_clip:ClipHeads-Tiny-ViT/no-such-tag")


def test_missing_local_folder_says_so(tmp_path):
    with pytest.raises(clipheads.ModelLoadError, match=r"model folder '.*/not-there' does not exist$"):
        clipheads.load(str(tmp_path / "not-there"))


def test_corrupt_local_folder_fails_clearly(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(clipheads.ModelLoadError) as info:
        clipheads.load(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_bad_dtype_is_refused():
    with pytest.raises(clipheads.ModelLoadError, match="unknown dtype"):
        clipheads.load("bundled", dtype="fp8")


def test_bundled_load_prints_no_transformers_progress_bar(capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    clipheads.load("bundled")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is restored
