"""The search split's pixels under a budget: uint8 codes and re-reading from disk give the preprocessed floats to the
last bit, and the search scores of a store equal those of the all-in-memory floats."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from clipheads.errors import DataError
from clipheads.search import MaskEvaluator, retrieval_objective, scan_heads
from clipheads.search.memory import plan_pixels
from clipheads.search.pixels import code_table, load_pixel_store
from clipheads.search.tasks import load_pixels


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Nine PNG and JPEG files of random sizes (so every model resamples them)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(9):
        array = rng.integers(0, 256, (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3), dtype=np.uint8)
        path = folder / f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("storage", ["uint8", "disk"])
def test_stored_pixels_are_the_preprocessed_floats_to_the_last_bit(tiny_backend, image_files, storage):
    floats, kept, _ = load_pixels(tiny_backend, image_files, batch_size=4)
    store, store_kept, _ = load_pixel_store(tiny_backend, image_files, storage, batch_size=4)
    assert store.storage == storage and len(store) == len(floats) and store.shape == floats.shape
    assert torch.equal(store_kept, kept)
    assert torch.equal(store.float(), floats)
    assert torch.equal(store[2:7], floats[2:7]) and torch.equal(store[-1], floats[-1])
    assert all(torch.equal(a, b) for a, b in zip(store.split(4), floats.split(4), strict=True))
    share = store.subset(slice(3, 7))  # a torchrun rank's share: still a store, the same pixels
    assert share.storage == storage and len(share) == 4 and torch.equal(share.float(), floats[3:7])
    if storage == "uint8":  # a byte a value, and a 3 x 256 table
        assert share.nbytes == floats[3:7].numel() + 3 * 256 * 4
        assert store.nbytes == floats.numel() + 3 * 256 * 4 < floats.nbytes / 3
    else:
        assert store.nbytes == 0


def test_search_scores_from_a_store_equal_the_in_memory_floats(tiny_hf, image_files):
    floats, _, _ = load_pixels(tiny_hf, image_files, batch_size=4)
    with torch.no_grad():  # captions near the images' own features, so that the scores differ between heads
        texts = tiny_hf.encode_image(floats) + torch.randn(len(floats), 1, generator=torch.Generator().manual_seed(0))
    objective = retrieval_objective(texts, torch.arange(len(floats)), "mean_recall")
    expected = scan_heads(MaskEvaluator(tiny_hf, floats, objective, batch_size=4))
    for storage in ("uint8", "disk"):
        store, _, _ = load_pixel_store(tiny_hf, image_files, storage, batch_size=4)
        got = scan_heads(MaskEvaluator(tiny_hf, store, objective, batch_size=4))
        assert got.baseline == expected.baseline and torch.equal(got.scores, expected.scores), storage


def test_siglip_pixels_are_exact_codes_too(image_files):
    from clipheads.models.random_init import random_siglip

    siglip = random_siglip()
    store, _, _ = load_pixel_store(siglip, image_files, "uint8", batch_size=4)
    assert store.storage == "uint8" and torch.equal(store.float(), load_pixels(siglip, image_files, batch_size=4)[0])


def test_head_means_from_a_store_equal_those_of_the_floats(tiny_hf, image_files):
    import clipheads

    floats, _, _ = load_pixels(tiny_hf, image_files, batch_size=4)
    store, _, _ = load_pixel_store(tiny_hf, image_files, "uint8", batch_size=4)
    assert torch.equal(clipheads.compute_head_means(tiny_hf, store.split(4)),
                       clipheads.compute_head_means(tiny_hf, floats.split(4)))


class _Blurred:
    """A backend whose preprocessing is not a per-channel map of 8-bit codes (a position-dependent offset)."""

    def __init__(self, backend):
        self._backend = backend
        self.name, self.image_size = "blurred", backend.image_size

    def preprocess(self, image):
        pixels = self._backend.preprocess(image)
        return pixels + torch.linspace(0, 1e-3, pixels.shape[-1])


def test_a_preprocessing_that_is_not_8_bit_codes_keeps_floats(tiny_hf, image_files, caplog):
    blurred = _Blurred(tiny_hf)
    assert code_table(tiny_hf) is not None and code_table(blurred) is None
    with caplog.at_level(logging.WARNING):
        store, _, _ = load_pixel_store(blurred, image_files, "uint8", batch_size=4)
    assert store.storage == "float32" and "kept as float32" in caplog.text
    assert torch.equal(store.float(), load_pixels(blurred, image_files, batch_size=4)[0])


def test_plan_pixels_keeps_floats_then_codes_then_nothing():
    values = 100 * 3 * 32 * 32
    assert plan_pixels(100, 32, None) == "float32"
    assert plan_pixels(100, 32, 16 * values) == "float32"
    assert plan_pixels(100, 32, 16 * values - 4) == "uint8"
    assert plan_pixels(100, 32, 4 * values) == "uint8"
    assert plan_pixels(100, 32, 4 * values - 4) == "disk"


def test_unknown_storage_is_one_line(tiny_hf, image_files):
    with pytest.raises(DataError, match="pixel storage must be one of float32, uint8, disk"):
        load_pixel_store(tiny_hf, image_files, "float16")


def test_the_evaluator_keeps_a_store_undecoded(tiny_hf, image_files, monkeypatch):
    """Building the evaluator of a uint8 store decodes batch by batch for the cache, never all images at once."""
    import clipheads.search.pixels as pixels_module

    store, _, _ = load_pixel_store(tiny_hf, image_files, "uint8", batch_size=4)
    decoded = []
    original = pixels_module.decode_codes
    monkeypatch.setattr(pixels_module, "decode_codes", lambda codes, table: decoded.append(len(codes))
                        or original(codes, table))
    objective = retrieval_objective(torch.randn(len(store), 64), torch.arange(len(store)), "mean_recall")
    MaskEvaluator(tiny_hf, store, objective, batch_size=4)
    assert decoded and max(decoded) <= 4
