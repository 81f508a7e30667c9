"""A built open_clip model is wrapped with its own tokenizer and preprocessing, or refused in one line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import clipheads
from clipheads.models.random_init import TINY_OPEN_CLIP, register_open_clip_configs

open_clip = pytest.importorskip("open_clip")
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402


def _tiny(vocab_size: int | None = None):
    register_open_clip_configs()
    torch.manual_seed(0)
    if vocab_size is None:
        return open_clip.create_model(TINY_OPEN_CLIP, pretrained=None).eval()
    cfg = open_clip.get_model_config(TINY_OPEN_CLIP)
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], {**cfg["text_cfg"], "vocab_size": vocab_size})
    open_clip.set_model_preprocess_cfg(model, open_clip.get_model_preprocess_cfg(
        open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)))
    return model.eval()


def test_clip_vocabulary_gets_clip_bpe_at_the_model_context_length():
    backend = clipheads.load(_tiny())
    expected = open_clip.get_tokenizer(TINY_OPEN_CLIP)(["a red circle"])
    got = backend.tokenize(["a red circle"])["text"]
    assert got.shape == (1, 16) and torch.equal(got, expected)


def test_other_vocabulary_is_refused_in_one_line_then_takes_the_given_tokenizer():
    model = _tiny(vocab_size=1000)
    with pytest.raises(clipheads.ModelLoadError, match="vocabulary 1000.*pass its tokenizer") as info:
        clipheads.load(model).encode_text(["a red circle"])
    assert "\n" not in str(info.value)

    def tokenizer(texts):  # a word-level stand-in for the model's own tokenizer (ids < 1000)
        ids = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [1 + sum(map(ord, w)) % 998 for w in text.split()][:16]
            ids[i, :len(words)] = torch.tensor(words)
        return ids

    backend = clipheads.load(model, tokenizer=tokenizer)
    with torch.inference_mode():
        assert backend.encode_text(["a red circle", "a blue square"]).shape == (2, 64)


def test_preprocessing_follows_the_model_config():
    model = _tiny()
    cfg = {**open_clip.get_model_preprocess_cfg(model), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
           "resize_mode": "squash"}
    open_clip.set_model_preprocess_cfg(model, cfg)
    image = Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy())
    expected = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(image)
    openai = open_clip.image_transform(32, is_train=False)(image)
    got = clipheads.load(model).preprocess(image)
    assert torch.equal(got, expected) and not torch.allclose(got, openai)


def test_model_without_preprocessing_config_is_refused_in_one_line():
    model = _tiny()
    for attr in ("preprocess_cfg", "image_mean", "image_std"):
        model.visual.__dict__.pop(attr, None)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(clipheads.ModelLoadError, match="no preprocessing config") as info:
        clipheads.load(model).preprocess(image)
    assert "\n" not in str(info.value)
    transform = open_clip.image_transform(32, is_train=False)
    assert torch.equal(clipheads.load(model, preprocess=transform).preprocess(image), transform(image))
