"""open_clip ViT variants beyond the class-token tower: CLIPA (average pooling, no ln_pre, LayerNorm after the pool)
and CoCa (attentional pooler over every token): operators against the naive reference, exact staged path, bake,
save/load + info and a demo-size scan, on tiny copies of the real configs (their head decomposition:
``tests/explain/test_decomposition_openclip_pools.py``)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipheads
from clipheads.interventions import OPERATORS
from clipheads.models.tiny_copies import TINY_VIT_CONFIGS, tiny_open_clip_copy

_spec = importlib.util.spec_from_file_location(
    "interventions_reference", Path(__file__).parents[1] / "interventions" / "test_reference.py")
_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reference)
naive_encode = _reference.naive_encode  # explicit softmax(QK^T/sqrt(d)) per head through open_clip's modules


@pytest.fixture(scope="module", params=tuple(TINY_VIT_CONFIGS))
def variant(request):
    return tiny_open_clip_copy(request.param)


def test_tiny_copies_keep_the_real_pooling(variant):
    visual = variant.model.visual
    if variant.name.startswith("open_clip:ViT-L-14-CLIPA"):
        assert visual.pool_type == "avg" and visual.final_ln_after_pool and visual.attn_pool is None
        assert isinstance(visual.ln_pre, torch.nn.Identity)
    else:
        assert type(visual.attn_pool).__name__ == "AttentionalPooler"
    assert variant.readout_tokens is None  # the embedding reads every token: no read-out shortcut


@pytest.mark.parametrize("op", OPERATORS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_operator_matches_naive_reference(variant, pixels, op, soft):
    _reference.test_operator_matches_naive_reference(variant, pixels, op, soft)


def test_all_ones_is_the_library_bit_for_bit(variant, pixels):
    with torch.no_grad():
        library = variant.model.encode_image(pixels, normalize=False)
        with clipheads.ablate(variant, clipheads.HeadMask.ones(variant)):
            assert torch.equal(variant.encode_image(pixels), library)
        assert torch.equal(variant.encode_image_staged(pixels), library)
    _reference.test_naive_reference_with_all_ones_is_the_library(variant, pixels)


def test_coca_encode_image_is_not_normalised_unless_asked(pixels):
    """CoCa's own encode_image normalises by default; the backend returns the raw embedding, like every model."""
    coca = tiny_open_clip_copy("coca_ViT-B-32")
    with torch.no_grad():
        raw = coca.encode_image(pixels)
        assert torch.equal(raw, coca.model.encode_image(pixels, normalize=False))
        assert torch.equal(coca.encode_image(pixels, normalize=True), F.normalize(raw, dim=-1))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(pixels)))


@pytest.mark.parametrize("op", ["zero", "scale"])
def test_bake_equals_the_ablation(variant, pixels, op):
    mask = clipheads.HeadMask.from_heads(["L0.H1", "L1.H3"], variant)
    with torch.no_grad():
        with clipheads.ablate(variant, mask, op=op, alpha=0.25):
            expected = variant.encode_image(pixels)
        got = clipheads.load(clipheads.bake(variant, mask, op=op, alpha=0.25)).encode_image(pixels)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_save_load_and_info(variant, tmp_path, run_main, pixels):
    folder = clipheads.save(variant, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(clipheads.load(folder).encode_image(pixels), variant.encode_image(pixels))
    code, out, err = run_main("info", "--model", folder)
    assert code == 0, err
    assert "open_clip" in out and "L1.H3" in out


def test_scan_finds_a_planted_head(variant):
    from clipheads.search import MaskEvaluator, Objective, scan_heads

    variant_copy = clipheads.load(copy.deepcopy(variant.model))
    with torch.no_grad():
        variant_copy.out_proj(1).weight[:, 2 * 16:3 * 16] *= 30.0
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), clipheads.ablate(variant_copy, clipheads.HeadMask.from_heads("L1.H2", variant_copy)):
        target = F.normalize(variant_copy.encode_image(pixels), dim=-1)

    def match(features: torch.Tensor) -> float:
        return -float((F.normalize(features, dim=-1) - target).pow(2).sum(dim=-1).mean())

    evaluator = MaskEvaluator(variant_copy, pixels, Objective(match, "match"), batch_size=16)
    mask = clipheads.HeadMask.from_heads("L1.H2", variant_copy)  # the fast path (last layer run whole) is exact
    with torch.no_grad(), clipheads.ablate(variant_copy, mask):
        expected = variant_copy.encode_image(pixels)
    assert (evaluator.features_many([mask])[0] - expected).abs().max() <= 1e-6
    assert scan_heads(evaluator).ranking()[0] == "L1.H2"
