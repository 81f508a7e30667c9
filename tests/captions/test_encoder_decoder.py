"""A Hugging Face VisionEncoderDecoderModel with a CLIP vision encoder as a captioner (tiny, random, offline)."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.captions import (
    VisionEncoderDecoderCaptioner,
    caption_vocabulary,
    generate_captions,
    load_captioner,
    random_vision_encoder_decoder,
)
from clipheads.errors import ClipHeadsError
from clipheads.models.random_init import tiny_model, word_tokenizer

CAPTIONS = ["a red circle on the left", "a blue square", "two green trees on a hill"]


@pytest.fixture(scope="module")
def captioner():
    """A tiny encoder-decoder, taught three captions with its own loss (a few steps)."""
    tokenizer = word_tokenizer(caption_vocabulary(CAPTIONS) + ["photo", "of"])
    captioner = random_vision_encoder_decoder(tokenizer, seed=0)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 1, 1, generator=generator).expand(3, 3, 32, 32) * 2 - 1
    ids = tokenizer(CAPTIONS, add_special_tokens=False)["input_ids"]
    length = max(len(i) for i in ids) + 1
    labels = torch.tensor([i + [tokenizer.eos_token_id] + [-100] * (length - len(i) - 1) for i in ids])
    model = captioner.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return captioner, pixels


def test_generates_the_captions_it_was_taught(captioner):
    model, pixels = captioner
    assert generate_captions(model, None, pixels) == CAPTIONS
    assert generate_captions(model, model.backend, pixels, num_beams=2) == CAPTIONS


def test_decoding_is_deterministic_and_keeps_the_prefix(captioner):
    model, pixels = captioner
    for beams in (1, 2):
        first = generate_captions(model, None, pixels, prefixes="a photo of", num_beams=beams)
        assert generate_captions(model, None, pixels, prefixes="a photo of", num_beams=beams) == first
        assert all(caption.startswith("a photo of") for caption in first)
    continued = generate_captions(model, None, pixels, prefixes=["a red", "a", "two green"])
    assert continued == CAPTIONS


def test_ablating_its_backend_changes_the_encoder_the_decoder_reads(captioner):
    model, pixels = captioner
    backend = model.backend
    assert backend.n_layers == 2 and backend.n_heads == 4
    clean = model.model.encoder(pixel_values=pixels).last_hidden_state
    with clipheads.ablate(backend, clipheads.HeadMask.from_layers("0-1", backend), op="zero"):
        ablated = model.model.encoder(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(backend.encode_image(pixels), backend.encode_image_staged(pixels))
    assert not torch.allclose(clean, ablated)
    torch.testing.assert_close(model.model.encoder(pixel_values=pixels).last_hidden_state, clean)


def test_a_foreign_clip_model_is_refused(captioner):
    model, pixels = captioner
    with pytest.raises(ClipHeadsError, match="reads its own CLIP encoder"):
        generate_captions(model, tiny_model("hf"), pixels)


def test_save_load_round_trip(captioner, tmp_path):
    model, pixels = captioner
    model.save(tmp_path / "ved")
    loaded = load_captioner(tmp_path / "ved")
    assert isinstance(loaded, VisionEncoderDecoderCaptioner)
    for beams in (1, 2):
        assert generate_captions(loaded, None, pixels, num_beams=beams) == \
            generate_captions(model, None, pixels, num_beams=beams)
