"""Task functions on a tiny model: same numbers as the metrics on hand-encoded features, masks, caching, bad images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipheads
from clipheads.data import load_caption_selection, load_classification, load_compositional, load_counterfactual
from clipheads.errors import ClipHeadsError, DataError
from clipheads.eval import (
    FeatureCache,
    encode_images,
    encode_texts,
    evaluate,
    evaluate_bias,
    evaluate_caption_selection,
    evaluate_compositional,
    evaluate_retrieval,
    evaluate_zeroshot,
)
from clipheads.metrics import compositional_metrics, retrieval_metrics


def hand_encoded(backend, paths, mask=None, op="identity"):
    pixels = torch.stack([backend.preprocess(Image.open(p)) for p in paths])
    with torch.inference_mode():
        if mask is None:
            return backend.encode_image(pixels, normalize=True)
        with clipheads.ablate(backend, mask, op):
            return backend.encode_image(pixels, normalize=True)


def test_retrieval_matches_metrics_on_hand_encoded_features(tiny_hf, retrieval_set):
    mask = clipheads.HeadMask.from_heads("L0.H1,L1.H2", tiny_hf)
    for m in (None, mask):
        result = evaluate_retrieval(tiny_hf, retrieval_set, mask=m, op="zero", batch_size=4, cache=FeatureCache())
        images = hand_encoded(tiny_hf, retrieval_set.image_paths, m, "zero")
        with torch.inference_mode():
            texts = tiny_hf.encode_text(retrieval_set.texts, normalize=True)
        expected = retrieval_metrics(images, texts, retrieval_set.text_to_image)
        assert result.metrics == pytest.approx(expected.metrics)
    assert tiny_hf.intervention is None and not tiny_hf.hooked_layers


def test_texts_encoded_once_and_images_once_per_mask_and_operator(tiny_hf, retrieval_set, counter):
    cache = FeatureCache()
    mask = clipheads.HeadMask.from_heads("L1.H0", tiny_hf)
    evaluate_retrieval(tiny_hf, retrieval_set, cache=cache)
    assert (counter.images, counter.texts) == (6, 12)
    evaluate_retrieval(tiny_hf, retrieval_set, mask=mask, op="zero", cache=cache)
    assert (counter.images, counter.texts) == (12, 12)  # new image features, text features reused
    evaluate_retrieval(tiny_hf, retrieval_set, mask=mask, op="zero", cache=cache)
    evaluate_retrieval(tiny_hf, retrieval_set, mask=clipheads.HeadMask.ones(tiny_hf), cache=cache)  # = no mask
    assert counter.images == 12
    evaluate_retrieval(tiny_hf, retrieval_set, mask=mask, op="identity", cache=cache)
    evaluate_retrieval(tiny_hf, retrieval_set, mask=mask, op="scale", alpha=0.5, cache=cache)
    assert (counter.images, counter.texts) == (24, 12)
    assert cache.misses == 5 and cache.hits["memory"] == 7  # 1 text + 4 image sets computed, 12 lookups


def test_in_place_weight_change_invalidates_memory_cache(retrieval_set):
    from clipheads.models.random_init import tiny_model

    backend, cache = tiny_model("hf", seed=3), FeatureCache()
    before = encode_images(backend, retrieval_set.image_paths, cache=cache).features
    clipheads.bake(backend, clipheads.HeadMask.from_heads("L0.H0", backend), op="zero", inplace=True)
    after = encode_images(backend, retrieval_set.image_paths, cache=cache).features
    assert not torch.allclose(before, after)


def test_disk_cache_hit_miss_and_files(tiny_hf, retrieval_set, world: Path, counter):
    mask = clipheads.HeadMask.from_heads("L0.H3", tiny_hf)
    first = encode_images(tiny_hf, retrieval_set.image_paths, mask, "zero", cache=FeatureCache(world / "cache"))
    encode_texts(tiny_hf, retrieval_set.texts, cache=FeatureCache(world / "cache"))
    files = sorted(p.name for p in (world / "cache").iterdir())
    assert len(files) == 4 and sum(f.endswith(".safetensors") for f in files) == 2
    sidecar = json.loads(next((world / "cache").glob("image-*.json")).read_text())
    assert sidecar["mask"] == ["L0.H3"] and sidecar["operator"] == {"name": "zero"}
    assert len(sidecar["model"]["weights_sha256"]) == 64 and sidecar["n_items"] == 6
    seen = counter.images, counter.texts

    fresh = FeatureCache(world / "cache")  # a new process: nothing in memory
    again = encode_images(tiny_hf, retrieval_set.image_paths, mask, "zero", cache=fresh)
    encode_texts(tiny_hf, retrieval_set.texts, cache=fresh)
    assert (counter.images, counter.texts) == seen and fresh.hits["disk"] == 2
    assert torch.equal(first.features, again.features)

    Image.new("RGB", (32, 32), (1, 2, 3)).save(retrieval_set.image_paths[0])  # content changed: a miss
    encode_images(tiny_hf, retrieval_set.image_paths, mask, "zero", cache=FeatureCache(world / "cache"))
    assert counter.images == seen[0] + 6


def test_a_full_disk_costs_the_cache_not_the_evaluation(tiny_hf, retrieval_set, world: Path, monkeypatch, caplog):
    import errno
    import os

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    cached = evaluate_retrieval(tiny_hf, retrieval_set, cache=FeatureCache(world / "cache"))
    assert cached.metrics == evaluate_retrieval(tiny_hf, retrieval_set, cache=FeatureCache()).metrics
    assert "features not cached: cannot write" in caplog.text and "disk is full" in caplog.text
    assert not [p for p in (world / "cache").iterdir()]  # no temporary file left behind


def test_bad_image_names_file_or_is_skipped_with_its_captions(tiny_hf, retrieval_set):
    retrieval_set.image_paths[2].write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*2\.png.*--skip-bad"):
        evaluate_retrieval(tiny_hf, retrieval_set, cache=FeatureCache())
    result = evaluate_retrieval(tiny_hf, retrieval_set, skip_bad=True, cache=FeatureCache())
    assert result.skipped_images == [str(retrieval_set.image_paths[2])]
    assert (result.n_images, result.n_texts) == (5, 10)
    cache = FeatureCache()
    evaluate_retrieval(tiny_hf, retrieval_set, skip_bad=True, cache=cache)
    with pytest.raises(DataError, match=r"2\.png"):  # a cached result with skipped images still refuses
        evaluate_retrieval(tiny_hf, retrieval_set, cache=cache)


def test_already_ablated_model(tiny_hf, retrieval_set):
    mask = clipheads.HeadMask.from_heads("L1.H1", tiny_hf)
    cache = FeatureCache()
    plain = encode_images(tiny_hf, retrieval_set.image_paths, cache=cache).features
    with clipheads.ablate(tiny_hf, mask, op="zero"):
        ablated = encode_images(tiny_hf, retrieval_set.image_paths, cache=cache).features
        with pytest.raises(ClipHeadsError, match="already has an ablation"):
            encode_images(tiny_hf, retrieval_set.image_paths, mask, cache=cache)
    assert not torch.allclose(plain, ablated)
    torch.testing.assert_close(ablated, encode_images(tiny_hf, retrieval_set.image_paths, mask, "zero",
                                                      cache=cache).features)


def test_half_precision_autocast_close_to_fp32(tiny_hf, retrieval_set):
    fp32 = encode_images(tiny_hf, retrieval_set.image_paths, cache=FeatureCache()).features
    bf16 = encode_images(tiny_hf, retrieval_set.image_paths, precision="amp_bf16", cache=FeatureCache()).features
    assert bf16.dtype == torch.float32 and (fp32 - bf16).abs().max() < 0.05
    with pytest.raises(ClipHeadsError, match="unknown precision"):
        encode_images(tiny_hf, retrieval_set.image_paths, precision="int8")
    with pytest.raises(ClipHeadsError, match="amp_bf16 for autocast"):  # bf16 is bf16 weights (open_clip's meaning)
        encode_images(tiny_hf, retrieval_set.image_paths, precision="bf16")


def test_zeroshot(tiny_hf, world: Path):
    rows = ["image,label"] + [f"img/{i}.png,{name}" for i, name in enumerate(["red", "green", "red", "blue"])]
    (world / "labels.csv").write_text("\n".join(rows) + "\n")
    dataset = load_classification(world / "labels.csv", templates=["a {} square", "a photo of {}"])
    result = evaluate_zeroshot(tiny_hf, dataset, per_class=True, cache=FeatureCache())
    images = hand_encoded(tiny_hf, dataset.image_paths)
    with torch.inference_mode():
        prompts = tiny_hf.encode_text(dataset.prompts(), normalize=True).view(3, 2, -1)
    classes = torch.nn.functional.normalize(prompts.mean(1), dim=-1)
    predicted = (images @ classes.T).argmax(1).tolist()
    assert result.acc1 == pytest.approx(sum(p == y for p, y in zip(predicted, dataset.labels, strict=True)) / 4)
    assert math.isnan(result.acc5) and set(result.per_class) == {"blue", "green", "red"}


def test_caption_selection(tiny_hf, world: Path):
    items = [{"image": f"img/{i}.png", "candidates": ["a red square", "a photo of blue", "a green square"],
              "answer": i % 3} for i in range(4)]
    (world / "sel.json").write_text(json.dumps(items))
    dataset = load_caption_selection(world / "sel.json")
    result = evaluate_caption_selection(tiny_hf, dataset, cache=FeatureCache())
    images = hand_encoded(tiny_hf, dataset.image_paths)
    with torch.inference_mode():
        texts = tiny_hf.encode_text(items[0]["candidates"], normalize=True)
    cosines = images @ texts.T
    assert result.predictions == cosines.argmax(1).tolist()
    torch.testing.assert_close(torch.tensor(result.logits), tiny_hf.logit_scale * cosines)
    assert result.cosine == pytest.approx(cosines.max(1).values.mean().item(), rel=1e-5)


def test_compositional_drops_pairs_with_a_skipped_image(tiny_hf, world: Path):
    pairs = [{"images": [f"img/{i}.png", f"img/{i + 1}.png"], "captions": ["a red square", "a blue square"]}
             for i in range(0, 6, 2)]
    (world / "pairs.json").write_text(json.dumps(pairs))
    dataset = load_compositional(world / "pairs.json")
    result = evaluate_compositional(tiny_hf, dataset, cache=FeatureCache())
    images = hand_encoded(tiny_hf, [p for pair in dataset.image_pairs for p in pair]).view(3, 2, -1)
    with torch.inference_mode():
        texts = tiny_hf.encode_text(["a red square", "a blue square"] * 3, normalize=True).view(3, 2, -1)
    assert result.metrics == pytest.approx(compositional_metrics(images, texts).metrics)
    (world / "img" / "3.png").unlink()
    skipped = evaluate_compositional(tiny_hf, dataset, skip_bad=True, cache=FeatureCache())
    assert skipped.n_pairs == 2 and skipped.skipped_images == [str(world / "img" / "3.png")]


def test_bias(tiny_hf, world: Path):
    images = [{"image": f"img/{i}.png", "group": f"g{i // 2}", "attribute": "colour" if i < 4 else "size",
               "value": ["a", "b"][i % 2]} for i in range(6)]
    (world / "bias.json").write_text(json.dumps({"queries": ["a photo", "a square"], "images": images}))
    result = evaluate("bias", tiny_hf, load_counterfactual(world / "bias.json"), k=2, cache=FeatureCache())
    assert set(result.max_skew) == {"colour", "size"} and result.max_skew["size"] == 0.0  # K = all size images
    assert all(0 <= v <= 0.7 for v in result.per_query["colour"])  # ln 2 at most with K = 2 of 2 + 2
    assert evaluate_bias(tiny_hf, load_counterfactual(world / "bias.json"), k=2).metrics == result.metrics


def test_bundled_model_warns_once_on_text_it_cannot_spell(caplog, monkeypatch):
    import logging

    from clipheads.eval import features

    monkeypatch.setattr(features, "_WARNED", set())
    model = clipheads.load("bundled")
    world = ["a red circle on the left", "a small blue square above a green star"]
    flickr = ["Two young guys with shaggy hair look at their hands while hanging out in the yard.",
              "A man in an orange hat starring at something."]
    assert features.unknown_word_fraction(model, world) == 0.0
    assert features.unknown_word_fraction(model, flickr) > features.UNKNOWN_WORDS_WARN
    with caplog.at_level(logging.WARNING, logger="clipheads"):
        features.encode_texts(model, world, cache=features.FeatureCache())
        assert not caplog.records
        features.encode_texts(model, flickr, cache=features.FeatureCache())
        features.encode_texts(model, flickr[::-1], cache=features.FeatureCache())
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    message = caplog.records[0].getMessage()
    assert message.startswith("the bundled model knows only the 28 words of its world: ")
    assert "are unknown to it" in message and "--model" in message
