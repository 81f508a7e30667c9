"""transformers SiglipModel: attention-pooling head instead of a class token, hooked through the same interface."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import clipheads
from clipheads.cli import app
from clipheads.explain.decomposition import decompose
from clipheads.models.random_init import save_hf, tiny_model


@pytest.fixture(scope="module")
def siglip():
    return tiny_model("siglip", seed=3)


def test_all_ones_mask_is_bit_exact_and_stages_match(siglip, pixels):
    with torch.inference_mode():
        reference = siglip.encode_image(pixels)
        library = siglip.model.get_image_features(pixel_values=pixels).pooler_output
        with clipheads.ablate(siglip, clipheads.HeadMask.ones(siglip)):
            assert siglip.hooked_layers == []
            out = siglip.encode_image(pixels)
        staged = siglip.encode_image_staged(pixels)
        x = siglip.run_layers(siglip.embed(pixels), 0, 1)
        split = siglip.pool(siglip.run_layers(siglip.run_layer_split(1, x), 2))
    assert torch.equal(out, reference) and torch.equal(reference, library)
    assert (staged - reference).abs().max() <= 1e-6 and (split - reference).abs().max() <= 1e-5
    assert siglip.readout_tokens is None  # the pooling head reads every token


def test_bake_equals_hooked_zero_ablation(siglip, pixels):
    mask = clipheads.HeadMask.from_heads("L0.H2,L1.H0", siglip)
    with torch.inference_mode():
        with clipheads.ablate(siglip, mask, op="zero"):
            hooked = siglip.encode_image(pixels)
        baked = clipheads.load(clipheads.bake(siglip, mask, op="zero")).encode_image(pixels)
    assert (baked - hooked).abs().max() <= 1e-5


def test_text_is_padded_to_full_length(siglip):
    tokens = siglip.tokenize(["a red circle", "two"])
    assert tokens["input_ids"].shape == (2, 16)
    with torch.inference_mode():
        assert siglip.encode_text(["a red circle"]).shape == (1, 64)


def test_folder_loads_and_info_names_the_heads(siglip, tmp_path, pixels):
    from transformers import SiglipImageProcessor

    siglip.image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    save_hf(siglip, tmp_path)
    loaded = clipheads.load(str(tmp_path))
    assert type(loaded).__name__ == "SiglipBackend"
    with torch.inference_mode():
        assert (loaded.encode_image(pixels) - siglip.encode_image(pixels)).abs().max() <= 1e-5
    result = CliRunner().invoke(app, ["info", "--model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "SiglipModel" in result.output and "L0.H0 .. L1.H3" in result.output


def test_decomposition_sums_to_the_embedding(siglip, pixels):
    """Decomposed through the attention-pooling head (tests/explain/test_decomposition_siglip.py for the rest)."""
    with torch.inference_mode():
        embedding = siglip.encode_image(pixels)
    assert (decompose(siglip, pixels, convention="centred").total() - embedding).abs().max() <= 1e-5


def test_single_head_scan_equals_one_at_a_time(siglip):
    """The search runs on SigLIP (without the read-out shortcut): each head's score is the ablated model's."""
    from clipheads.search import MaskEvaluator, Objective, scan_heads

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32, generator=generator)
    weights = torch.randn(64, generator=generator)
    objective = Objective(lambda f: float((torch.tanh(f) * weights).sum()), "feature_sum")
    evaluator = MaskEvaluator(siglip, pixels, objective, op="zero", batch_size=8)
    scan = scan_heads(evaluator, max_top_k=1)
    for layer, head in [(0, 0), (1, 3)]:
        mask = clipheads.HeadMask.from_heads([(layer, head)], siglip)
        with torch.no_grad(), clipheads.ablate(siglip, mask, op="zero"):
            expected = objective(siglip.encode_image(pixels))
        assert scan.scores[layer, head].item() == pytest.approx(expected, rel=1e-6, abs=1e-5)
    assert siglip.hooked_layers == []
