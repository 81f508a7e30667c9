"""The attribution estimate equals a finite-difference estimate of the same surrogate."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.models.random_init import tiny_model
from clipheads.search.attribution import attribution_scan, contrastive_surrogate


def _surrogate(backend, pixels, texts, t2i, gates, op):
    with torch.no_grad(), clipheads.ablate(backend, clipheads.HeadMask.from_tensor(gates.clone()), op=op):
        feats = backend.encode_image(pixels)
    return float(contrastive_surrogate(feats, texts, t2i, backend.logit_scale))


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
@pytest.mark.parametrize("op", ["identity", "zero"])
def test_attribution_equals_finite_differences(kind, op):
    backend = tiny_model(kind, seed=11)
    backend.model.double()
    torch.manual_seed(0)
    pixels = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    texts = torch.randn(9, backend.encode_image(pixels[:1]).shape[1], dtype=torch.float64)
    t2i = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5])
    result = attribution_scan(backend, pixels, texts, t2i, op=op, batch_size=4)  # two batches
    eps = 1e-4
    ones = torch.ones(backend.n_layers, backend.n_heads, dtype=torch.float64)
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        up, down = ones.clone(), ones.clone()
        up[layer, head] += eps
        down[layer, head] -= eps
        derivative = (_surrogate(backend, pixels, texts, t2i, up, op)
                      - _surrogate(backend, pixels, texts, t2i, down, op)) / (2 * eps)
        assert result.estimated_delta[layer, head].item() == pytest.approx(-derivative, rel=1e-4, abs=1e-8)
    assert result.surrogate == pytest.approx(_surrogate(backend, pixels, texts, t2i, ones, op), rel=1e-9)
