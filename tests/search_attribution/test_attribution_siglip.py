"""The attribution scan on SigLIP (attention-pooling head): its estimate equals finite differences of the same
surrogate on the plain ablated ``encode_image``; the ``cls`` operator is refused before any work."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.errors import OperatorError
from clipheads.models.random_init import tiny_model
from clipheads.search.attribution import SURROGATES, attribution_scan


def _surrogate(backend, pixels, texts, t2i, gates, op, surrogate):
    with torch.no_grad(), clipheads.ablate(backend, clipheads.HeadMask.from_tensor(gates.clone()), op=op):
        features = backend.encode_image(pixels)
    return float(SURROGATES[surrogate](features, texts, t2i, backend.logit_scale))


@pytest.fixture(scope="module")
def siglip():
    backend = tiny_model("siglip", seed=11)
    backend.model.double()
    return backend


@pytest.mark.parametrize(("op", "surrogate"), [("identity", "contrastive"), ("zero", "soft_recall")])
def test_attribution_equals_finite_differences(siglip, op, surrogate):
    torch.manual_seed(0)
    pixels = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    texts = torch.randn(9, 64, dtype=torch.float64)
    t2i = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5])
    result = attribution_scan(siglip, pixels, texts, t2i, op=op, batch_size=4, surrogate=surrogate, order=1)
    eps = 1e-4
    ones = torch.ones(siglip.n_layers, siglip.n_heads, dtype=torch.float64)
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        up, down = ones.clone(), ones.clone()
        up[layer, head] += eps
        down[layer, head] -= eps
        derivative = (_surrogate(siglip, pixels, texts, t2i, up, op, surrogate)
                      - _surrogate(siglip, pixels, texts, t2i, down, op, surrogate)) / (2 * eps)
        assert result.estimated_delta[layer, head].item() == pytest.approx(-derivative, rel=1e-4, abs=1e-8)
    assert result.surrogate == pytest.approx(_surrogate(siglip, pixels, texts, t2i, ones, op, surrogate), rel=1e-9)
    assert siglip.hooked_layers == []


def test_cls_operator_is_refused_before_any_work(siglip, monkeypatch):
    monkeypatch.setattr(type(siglip), "encode_image", lambda *a, **k: pytest.fail("encoded before the refusal"))
    with pytest.raises(OperatorError, match="needs a class token"):
        attribution_scan(siglip, torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randn(2, 64,
                         dtype=torch.float64), [0, 1], op="cls", batch_size=2)
