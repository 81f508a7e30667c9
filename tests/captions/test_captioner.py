"""The ClipCap-style captioner: learns, decodes deterministically, keeps text prefixes, round-trips, sees ablations."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.captions import (
    CaptionTrainConfig,
    PrefixCaptioner,
    build_captioner,
    caption_vocabulary,
    clip_scores,
    encode_images,
    generate_captions,
    load_captioner,
    train_captioner,
)
from clipheads.errors import ClipHeadsError, ModelLoadError


def test_overfits_a_handful_of_pairs(trained, clip, images, captions):
    captioner, result = trained
    assert len(result.epoch_losses) == 100 and len(result.step_losses) == 100
    assert result.epoch_losses[-1] < 0.1 * result.epoch_losses[0]
    generated = generate_captions(captioner, clip, images)
    assert sum(g == c for g, c in zip(generated, captions, strict=True)) >= 5, generated


def test_training_is_deterministic_for_a_seed(clip, images, captions):
    features = encode_images(clip, images[:3])
    config = CaptionTrainConfig(epochs=3, batch_size=2, lr=1e-2, progress=False, seed=7)
    runs = []
    for _ in range(2):
        captioner = build_captioner(captions[:3], features.shape[-1], prefix_length=2, width=16, n_layers=1,
                                    n_heads=2, seed=1)
        runs.append(train_captioner(captioner, features, captions[:3], config=config).step_losses)
    assert runs[0] == runs[1]


def test_several_captions_per_image(clip, images, captions):
    features = encode_images(clip, images[:2])
    captioner = build_captioner(captions[:4], features.shape[-1], prefix_length=2, width=16, n_layers=1, n_heads=2)
    result = train_captioner(captioner, features, captions[:4], image_index=[0, 0, 1, 1],
                             config=CaptionTrainConfig(epochs=1, batch_size=4, progress=False))
    assert result.n_images == 2 and result.n_pairs == 4
    with pytest.raises(ClipHeadsError, match="outside"):
        train_captioner(captioner, features, captions[:2], image_index=[0, 2])


def test_decoding_is_deterministic(trained, clip, images):
    captioner, _ = trained
    for beams in (1, 3):
        first = generate_captions(captioner, clip, images, num_beams=beams)
        assert generate_captions(captioner, clip, images, num_beams=beams) == first
        # an image's caption does not depend on the other images in its batch
        assert generate_captions(captioner, clip, images[2:3], num_beams=beams) == first[2:3]
        assert generate_captions(captioner, clip, images, num_beams=beams, batch_size=4) == first


def test_beam_search_finds_the_training_captions(trained, clip, images, captions):
    captioner, _ = trained
    generated = generate_captions(captioner, clip, images, num_beams=3)
    assert sum(g == c for g, c in zip(generated, captions, strict=True)) >= 5, generated


def test_text_prefix_is_the_start_of_the_caption(trained, clip, images, captions):
    captioner, _ = trained
    for beams in (1, 2):
        for caption in generate_captions(captioner, clip, images, prefixes="A photo of a", num_beams=beams):
            assert caption.startswith("A photo of a")
    # the prefix the image was trained with is continued into its own caption
    prefixes = ["a red circle", "a blue", "two green", "a black cat", "a white dog in", None]
    generated = generate_captions(captioner, clip, images, prefixes=prefixes)
    for caption, prefix in zip(generated, prefixes, strict=True):
        assert caption.startswith(prefix or "")
    assert sum(g == c for g, c in zip(generated, captions, strict=True)) >= 5, generated
    with pytest.raises(ClipHeadsError, match="2 text prefixes for 6 images"):
        generate_captions(captioner, clip, images, prefixes=["a", "b"])


def test_save_load_round_trip_gives_identical_captions(trained, clip, images, tmp_path):
    captioner, _ = trained
    captioner.save(tmp_path / "captioner")
    loaded = load_captioner(tmp_path / "captioner")
    assert isinstance(loaded, PrefixCaptioner)
    assert loaded.config == captioner.config
    for beams in (1, 3):
        for prefix in (None, "a photo of a"):
            assert generate_captions(loaded, clip, images, prefix, num_beams=beams) == \
                generate_captions(captioner, clip, images, prefix, num_beams=beams)


def test_an_ablation_changes_what_the_captioner_reads(trained, clip, images):
    captioner, _ = trained
    clean = generate_captions(captioner, clip, images)
    mask = clipheads.HeadMask.from_layers("0-1", clip)
    with clipheads.ablate(clip, mask, op="zero"):
        ablated_embeddings = clip.encode_image(images)
        ablated = generate_captions(captioner, clip, images)
    assert not torch.allclose(ablated_embeddings, clip.encode_image(images))
    assert ablated == captioner.generate_from_embeddings(ablated_embeddings)
    assert ablated != clean
    assert generate_captions(captioner, clip, images) == clean  # nothing left behind


def test_bad_inputs_give_clear_errors(trained, clip, images, tmp_path):
    captioner, _ = trained
    with pytest.raises(ClipHeadsError, match="reads 64-d image embeddings"):
        captioner.generate_from_embeddings(torch.randn(2, 32))
    with pytest.raises(ClipHeadsError, match="exceeds the decoder's 64 positions"):
        generate_captions(captioner, clip, images, max_new_tokens=100)
    with pytest.raises(ClipHeadsError, match="needs the CLIP model"):
        generate_captions(captioner, None, images)
    with pytest.raises(ModelLoadError, match="neither a clipheads captioner"):
        load_captioner(tmp_path)


def test_vocabulary_follows_the_word_tokenizer():
    words = caption_vocabulary(["A cat, a dog.", "a cat"])
    assert words == ["a", "cat", ",", ".", "dog"]


def test_clip_score_is_100_times_positive_cosine(clip, images):
    texts = ["a red circle", "a blue square", "two green trees"]
    scores = clip_scores(clip, images[:3], texts)
    cos = torch.nn.functional.cosine_similarity(clip.encode_image(images[:3]), clip.encode_text(texts), dim=-1)
    assert (cos > 0).any() and (cos < 0).any()  # both sides of the clamp are exercised
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0))
    torch.testing.assert_close(clip_scores(clip, clip.encode_image(images[:3]), texts), scores)
