"""Where models come from: the cache before the Hub (no process-wide switch), the spellings users copy, and one
line for a folder that cannot work (image processor of another size, an image tower alone)."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.models import open_clip_name
from clipheads.models.hf import from_cache_or_hub
from clipheads.models.random_init import TINY_OPEN_CLIP, random_hf_clip, save_hf


def test_cache_first_then_hub_only_when_reachable(monkeypatch):
    from huggingface_hub import constants

    calls, seen = [], []

    def loader(name, **kwargs):
        calls.append(kwargs)
        seen.append(constants.HF_HUB_OFFLINE)
        if kwargs.get("local_files_only"):
            raise OSError("not in the cache")
        return "from the hub"

    before = constants.HF_HUB_OFFLINE
    monkeypatch.setattr("clipheads.models.hf._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OSError, match="not in the cache"):
        from_cache_or_hub(loader, "org/model")
    assert calls == [{"local_files_only": True}]
    monkeypatch.setattr("clipheads.models.hf._hub_reachable", lambda timeout=3.0: True)
    assert from_cache_or_hub(loader, "org/model") == "from the hub"
    assert calls[1:] == [{"local_files_only": True}, {}]
    assert set(seen) == {before} and before == constants.HF_HUB_OFFLINE  # never switched for the process


def test_unreachable_hub_fails_in_one_line_without_switching_offline(monkeypatch):
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    monkeypatch.setattr("clipheads.models.hf._hub_reachable", lambda timeout=3.0: False)
    for name in ("nobody/no-such-clip-model", "hf-hub:nobody/no-such-clip-model"):
        with pytest.raises(clipheads.ModelLoadError) as info:
            clipheads.load(name)
        assert "\n" not in str(info.value) and "nobody/no-such-clip-model" in str(info.value)
    assert before == constants.HF_HUB_OFFLINE


def test_spellings_users_copy():
    assert open_clip_name("hf-hub:laion/CLIP-ViT-B-32") == "open_clip:hf-hub:laion/CLIP-ViT-B-32"
    assert open_clip_name("open-clip:laion/CLIP-ViT-B-32") == "open_clip:hf-hub:laion/CLIP-ViT-B-32"
    assert open_clip_name("ViT-B-32") == "open_clip:ViT-B-32"
    assert open_clip_name("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    assert open_clip_name("bundled-like-name") == "bundled-like-name"
    backend = clipheads.load(TINY_OPEN_CLIP)  # clip_benchmark's --model ARCH (random weights without --pretrained)
    assert backend.kind == "open_clip" and backend.n_layers == 2


def test_pretrained_tag_is_checked_and_refused_for_hf_names():
    with pytest.raises(clipheads.ModelLoadError, match="neither a checkpoint file nor a pretrained tag"):
        clipheads.load("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(clipheads.ModelLoadError, match="is for open_clip models"):
        clipheads.load("openai/clip-vit-base-patch32", pretrained="openai")


def test_processor_of_another_size_is_refused_at_load(tmp_path):
    from transformers import CLIPImageProcessor

    backend = random_hf_clip("tiny", seed=1)
    backend.image_processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    save_hf(backend, tmp_path)
    with pytest.raises(clipheads.ModelLoadError, match="makes 48x48 images but the model takes 32x32") as info:
        clipheads.load(str(tmp_path))
    assert "\n" not in str(info.value)


def test_vision_tower_alone_is_refused_with_what_to_pass(tmp_path):
    from transformers import CLIPVisionModel

    backend = random_hf_clip("tiny", seed=1)
    vision = CLIPVisionModel(backend.model.config.vision_config).eval()
    vision.save_pretrained(tmp_path)
    for source in (str(tmp_path), vision):
        with pytest.raises(clipheads.ModelLoadError, match="image tower alone.*whole dual encoder") as info:
            clipheads.load(source)
        assert "\n" not in str(info.value)
    torch.manual_seed(0)  # the full model of the same folder family still loads
    save_hf(backend, tmp_path / "full")
    assert clipheads.load(str(tmp_path / "full")).n_layers == 2


def test_open_clip_tag_in_the_cache_is_read_as_a_file_with_the_tags_preprocessing(monkeypatch, tmp_path):
    import open_clip

    from clipheads.models.openclip import _local_first

    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"")
    asked = []

    def cached(repo, filename, local_files_only=False, **kwargs):
        asked.append((repo, filename, local_files_only))
        return str(weights)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", cached)
    arch, pretrained, extra = _local_first("ViT-B-32", "laion2b_s34b_b79k")
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    assert (arch, pretrained) == ("ViT-B-32", str(weights)) and all(local for *_, local in asked)
    assert asked[0][0] == tag["hf_hub"].rstrip("/")
    assert extra["force_preprocess_cfg"]["mean"] == tag["mean"]


def test_a_tokenizer_that_cannot_be_loaded_is_named_in_one_line(monkeypatch):
    """open_clip's SigLIP configs build offline but fetch their Hugging Face tokenizer: the line says so (it used to
    talk about the weights)."""
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files. Check your connection")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.raises(clipheads.ModelLoadError) as info:
        clipheads.load(TINY_OPEN_CLIP)
    message = str(info.value)
    assert "\n" not in message and "the model was built, but its tokenizer could not be loaded" in message
    assert "weights" not in message
