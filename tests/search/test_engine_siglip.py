"""The mask evaluator's fast path on SigLIP (read by an attention-pooling head, no class token): the first
recomputed layer's attention shared over the masks of a group, the last layer run whole (the pool reads every
token); every score equals the plain ablated ``encode_image``."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.errors import OperatorError
from clipheads.models.random_init import random_siglip
from clipheads.search import MaskEvaluator, Objective, scan_heads

ATOL = 1e-6


@pytest.fixture(scope="module")
def setup():
    backend = random_siglip("small", seed=5)  # 6 layers x 8 heads, 64 px: 64 tokens
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 64, 64, generator=generator)
    weights = torch.randn(128, generator=generator)
    return backend, pixels, Objective(lambda f: float((torch.tanh(f) * weights).sum()), "feature_sum")


def plain_features(backend, pixels, mask, op="identity"):
    with torch.no_grad(), clipheads.ablate(backend, mask, op=op):
        return backend.encode_image(pixels)


def test_the_fast_path_is_on_and_shares_the_attention(setup, monkeypatch):
    backend, pixels, objective = setup
    evaluator = MaskEvaluator(backend, pixels, objective, batch_size=16)
    assert evaluator.fast_path and backend.readout_tokens is None
    calls = []
    original = type(backend).layer_attention
    monkeypatch.setattr(type(backend), "layer_attention",
                        lambda self, layer, x, queries=None: calls.append((layer, len(x), queries))
                        or original(self, layer, x, queries))
    masks = [clipheads.HeadMask.from_heads(h, backend) for h in ("L2.H0", "L2.H5,L4.H1", "L2.H7,L5.H3", "L2.H1")]
    evaluator.features_many(masks)
    assert calls == [(2, 4, None)]  # one attention of layer 2 for the 4 masks x 4 images, every query token


@pytest.mark.parametrize("op", ["identity", "zero", "mean"])
def test_scan_equals_one_at_a_time(setup, op):
    backend, pixels, objective = setup
    means = clipheads.compute_head_means(backend, pixels) if op == "mean" else None
    evaluator = MaskEvaluator(backend, pixels, objective, op=op, means=means, batch_size=32)
    scan = scan_heads(evaluator, max_top_k=1)
    heads = [(0, 0), (2, 5), (4, 7), (5, 3)]
    masks = [clipheads.HeadMask.from_heads([h], backend) for h in heads]
    for (layer, head), mask, features in zip(heads, masks, evaluator.features_many(masks), strict=True):
        with torch.no_grad(), clipheads.ablate(backend, mask, op=op, means=means):
            expected = backend.encode_image(pixels)
        assert (features - expected).abs().max() <= ATOL  # measured bit-exact on CPU fp32
        assert scan.scores[layer, head].item() == pytest.approx(objective(expected), abs=1e-5)
    assert backend.hooked_layers == []


def test_stacked_strided_features_equal_the_plain_path(setup):
    backend, pixels, objective = setup
    generator = torch.Generator().manual_seed(1)
    masks = [clipheads.HeadMask((torch.rand(6, 8, generator=generator) > 0.3).float()) for _ in range(5)]
    masks.append(clipheads.HeadMask.from_heads("L5.H2", backend))  # the last layer only: its own split
    variants = [MaskEvaluator(backend, pixels, objective, batch_size=64),
                MaskEvaluator(backend, pixels, objective, batch_size=4, masks_per_forward=1),
                MaskEvaluator(backend, pixels, objective, batch_size=64, cache_stride=4)]
    assert variants[0].masks_per_forward > 1
    worst = 0.0
    for evaluator in variants:
        for mask, features in zip(masks, evaluator.features_many(masks), strict=True):
            worst = max(worst, float((features - plain_features(backend, pixels, mask)).abs().max()))
    assert worst <= ATOL


def test_the_cls_operator_is_refused_in_one_line(setup):
    backend, pixels, objective = setup
    for run in (lambda: MaskEvaluator(backend, pixels, objective, op="cls"),
                lambda: clipheads.apply(backend, clipheads.HeadMask.from_heads("L0.H0", backend), op="cls")):
        with pytest.raises(OperatorError, match="needs a class token") as info:
            run()
        assert "\n" not in str(info.value)
    assert backend.hooked_layers == [] and backend.intervention is None
