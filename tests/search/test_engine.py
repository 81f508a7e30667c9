"""The mask evaluator: cached, batched and memoised evaluation equals plain ablated encoding."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.errors import ClipHeadsError
from clipheads.models.random_init import tiny_model
from clipheads.search import MaskEvaluator, Objective, scan_heads

ATOL = 1e-5


def feature_sum_objective(weights: torch.Tensor) -> Objective:
    """A made-up smooth objective of all image features (any float function of the features will do)."""
    return Objective(lambda f: float((torch.tanh(f) * weights[: f.shape[1]]).sum()), "feature_sum")


def plain_features(backend, pixels, mask, op="identity"):
    """Reference: the library's full encode_image with the mask applied, no cache."""
    with torch.no_grad(), clipheads.ablate(backend, mask, op=op):
        return backend.encode_image(pixels)


@pytest.fixture(scope="module", params=["hf", "open_clip"])
def setup(request):
    backend = tiny_model(request.param, seed=5)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(5, 3, 32, 32, generator=generator)
    weights = torch.randn(512, generator=generator)
    return backend, pixels, feature_sum_objective(weights)


def random_masks(n: int, shape=(2, 4), seed: int = 0) -> list[clipheads.HeadMask]:
    generator = torch.Generator().manual_seed(seed)
    return [clipheads.HeadMask((torch.rand(shape, generator=generator) > 0.4).float()) for _ in range(n)]


@pytest.mark.parametrize("op", ["identity", "zero", "cls"])
def test_scan_equals_one_at_a_time(setup, op):
    backend, pixels, objective = setup
    evaluator = MaskEvaluator(backend, pixels, objective, op=op, batch_size=16)
    scan = scan_heads(evaluator, max_top_k=2)
    assert evaluator.baseline == pytest.approx(objective(plain_features(backend, pixels, clipheads.HeadMask.ones(
        backend))), abs=ATOL)
    for layer in range(backend.n_layers):
        for head in range(backend.n_heads):
            mask = clipheads.HeadMask.from_heads([(layer, head)], backend)
            expected = objective(plain_features(backend, pixels, mask, op))
            assert scan.scores[layer, head].item() == pytest.approx(expected, abs=ATOL)
    assert scan.delta.shape == (backend.n_layers, backend.n_heads)
    assert [e["k"] for e in scan.top_k] == [1, 2]
    assert scan.top_k[1]["heads"] == scan.ranking()[:2]
    assert backend.hooked_layers == []  # the evaluator leaves the model as it found it


def test_cached_batched_features_equal_uncached(setup):
    backend, pixels, objective = setup
    masks = random_masks(7)
    # 3 masks x 5 images per forward, images in chunks of 2 when one mask runs alone, residuals every 2nd layer
    variants = [MaskEvaluator(backend, pixels, objective, batch_size=16),
                MaskEvaluator(backend, pixels, objective, batch_size=2, masks_per_forward=1),
                MaskEvaluator(backend, pixels, objective, batch_size=64, cache_stride=2)]
    assert variants[0].masks_per_forward == 3
    for evaluator in variants:
        for mask, features in zip(masks, evaluator.features_many(masks), strict=True):
            torch.testing.assert_close(features, plain_features(backend, pixels, mask), atol=ATOL, rtol=0)
    scores = [v.evaluate_many(masks) for v in variants]
    for other in scores[1:]:
        assert other == pytest.approx(scores[0], abs=ATOL)


def test_memo_never_evaluates_a_mask_twice(setup):
    backend, pixels, _ = setup
    calls = []
    objective = Objective(lambda f: calls.append(1) or float(f.sum()), "sum")
    evaluator = MaskEvaluator(backend, pixels, objective, batch_size=16)
    masks = random_masks(4)
    first = evaluator.evaluate_many(masks + masks[:2])  # repeats inside one call
    assert len(calls) == 1 + len({m.key() for m in masks})  # baseline + distinct masks
    assert evaluator.evaluate_many(masks) == first[:4]
    assert evaluator.evaluate(clipheads.HeadMask.ones(backend)) == evaluator.baseline
    assert len(calls) == 1 + len({m.key() for m in masks})


def test_soft_and_scale_gates_match_ablate(setup):
    backend, pixels, objective = setup
    mask = clipheads.HeadMask(torch.tensor([[1.0, 0.3, 1.0, 0.0], [0.7, 1.0, 1.0, 1.0]]))
    evaluator = MaskEvaluator(backend, pixels, objective, op="scale", alpha=0.5)
    with torch.no_grad(), clipheads.ablate(backend, mask, op="scale", alpha=0.5):
        expected = objective(backend.encode_image(pixels))
    assert evaluator.evaluate(mask) == pytest.approx(expected, abs=ATOL)


def test_refuses_a_model_with_an_ablation_applied(setup):
    backend, pixels, objective = setup
    with clipheads.ablate(backend, clipheads.HeadMask.from_heads("L0.H0", backend)), \
            pytest.raises(ClipHeadsError, match="remove"):
        MaskEvaluator(backend, pixels, objective)


def test_mask_of_another_shape_is_refused(setup):
    backend, pixels, objective = setup
    evaluator = MaskEvaluator(backend, pixels, objective)
    with pytest.raises(clipheads.MaskError):
        evaluator.evaluate(clipheads.HeadMask.ones((3, 4)))
