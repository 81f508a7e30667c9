"""The attribution estimate equals a finite-difference estimate of the same surrogate, its second-order term the
surrogate's curvature along finite-difference feature changes; the soft-recall surrogate is mean recall made smooth."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.metrics import retrieval_metrics
from clipheads.models.random_init import tiny_model
from clipheads.search import attribution
from clipheads.search.attribution import SURROGATES, attribution_scan, soft_recall_surrogate


def _features(backend, pixels, gates, op):
    with torch.no_grad(), clipheads.ablate(backend, clipheads.HeadMask.from_tensor(gates.clone()), op=op):
        return backend.encode_image(pixels)


def _surrogate(backend, pixels, texts, t2i, gates, op, surrogate):
    return float(SURROGATES[surrogate](_features(backend, pixels, gates, op), texts, t2i, backend.logit_scale))


def _family(kind: str):
    """A tiny random model of one family of the README's table (transformers, open_clip, timm trunks)."""
    from clipheads.models.tiny_copies import TINY_TIMM_CONFIGS, tiny_open_clip_copy, tiny_timm_open_clip

    if kind in TINY_TIMM_CONFIGS:
        return tiny_timm_open_clip(kind, seed=11)
    if kind in ("ViT-L-14-CLIPA", "coca_ViT-B-32"):
        return tiny_open_clip_copy(kind, seed=11)
    return tiny_model(kind, seed=11)


# the families of the README's table besides hf/open_clip (and SigLIP: test_attribution_siglip.py)
FAMILIES = ["chinese", "altclip", "metaclip2", "siglip2", "towers", "ViT-B-16-SigLIP", "EVA01-g-14", "EVA02-B-16",
            "EVA02-E-14", "ViT-L-14-CLIPA", "coca_ViT-B-32"]


@pytest.mark.parametrize(("kind", "op", "surrogate"),
                         [(kind, op, surrogate) for kind in ("hf", "open_clip")
                          for op, surrogate in [("identity", "contrastive"), ("zero", "contrastive"),
                                                ("identity", "soft_recall")]]
                         + [(kind, "identity", "contrastive") for kind in FAMILIES])
def test_attribution_equals_finite_differences(kind, op, surrogate):
    backend = _family(kind)
    backend.model.double()
    torch.manual_seed(0)
    pixels = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    texts = torch.randn(9, backend.encode_image(pixels[:1]).shape[1], dtype=torch.float64)
    t2i = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5])
    result = attribution_scan(backend, pixels, texts, t2i, op=op, batch_size=4,  # two batches
                              surrogate=surrogate, order=1)
    eps = 1e-4
    ones = torch.ones(backend.n_layers, backend.n_heads, dtype=torch.float64)
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        up, down = ones.clone(), ones.clone()
        up[layer, head] += eps
        down[layer, head] -= eps
        derivative = (_surrogate(backend, pixels, texts, t2i, up, op, surrogate)
                      - _surrogate(backend, pixels, texts, t2i, down, op, surrogate)) / (2 * eps)
        assert result.estimated_delta[layer, head].item() == pytest.approx(-derivative, rel=1e-4, abs=1e-8)
    assert result.surrogate == pytest.approx(_surrogate(backend, pixels, texts, t2i, ones, op, surrogate), rel=1e-9)
    assert result.estimated_delta.abs().max() > 1e-6  # the heads move the surrogate: the comparison means something


def test_soft_recall_tends_to_mean_recall():
    torch.manual_seed(0)
    images, texts = torch.randn(30, 16, dtype=torch.float64), torch.randn(45, 16, dtype=torch.float64)
    t2i = torch.arange(45) % 30
    texts[:30] += 1.5 * images  # some captions are close to their image
    exact = retrieval_metrics(torch.nn.functional.normalize(images, dim=-1),
                              torch.nn.functional.normalize(texts, dim=-1), t2i).metrics["mean_recall"]
    smooth = soft_recall_surrogate(images, texts, t2i, similarity_temperature=1e-6, rank_temperature=1e-3)
    assert float(smooth) == pytest.approx(exact, abs=1e-6)
    assert 0 < float(soft_recall_surrogate(images, texts, t2i)) < 1


def test_given_image_features_skip_the_first_pass_with_the_same_result(tiny_backend, pixels):
    texts = torch.randn(4, tiny_backend.encode_image(pixels[:1]).shape[1], generator=torch.Generator().manual_seed(0))
    t2i = torch.tensor([0, 1, 2, 2])
    computed = attribution_scan(tiny_backend, pixels, texts, t2i, batch_size=2)
    with torch.no_grad():
        features = tiny_backend.encode_image(pixels)
    given = attribution_scan(tiny_backend, pixels, texts, t2i, batch_size=2, image_features=features)
    torch.testing.assert_close(given.estimated_delta, computed.estimated_delta, atol=1e-6, rtol=1e-5)
    assert given.surrogate == pytest.approx(computed.surrogate, abs=1e-6)
    with pytest.raises(clipheads.ClipHeadsError, match="image features"):
        attribution_scan(tiny_backend, pixels, texts, t2i, image_features=features[:2])


def test_one_batch_gives_the_same_estimate_as_several(tiny_backend, pixels):
    """All images in one batch take the one-pass route (no separate pass without gradients); same numbers."""
    texts = torch.randn(4, tiny_backend.encode_image(pixels[:1]).shape[1], generator=torch.Generator().manual_seed(0))
    t2i = torch.tensor([0, 1, 2, 2])
    several = attribution_scan(tiny_backend, pixels, texts, t2i, batch_size=2)
    one = attribution_scan(tiny_backend, pixels, texts, t2i, batch_size=len(pixels))
    torch.testing.assert_close(one.estimated_delta, several.estimated_delta, atol=1e-6, rtol=1e-5)
    assert one.surrogate == pytest.approx(several.surrogate, abs=1e-6)
    assert all(p.requires_grad for p in tiny_backend.model.parameters())


@pytest.mark.parametrize(("kind", "op"), [("hf", "identity"), ("open_clip", "zero"), ("hf", "cls")])
def test_second_order_term_is_the_curvature_along_each_heads_feature_change(kind, op, monkeypatch):
    """Reference: J_ih = d(features of image i)/d(gate h) by central differences, H_ii = the surrogate's Hessian in
    image i's features (autograd): the second-order part is sum_i 1/2 J_ih^T H_ii J_ih.

    Checked exactly with probes whose mean z z^T is I deterministically (each coordinate of each image alone, scaled):
    the random sign probes have E[z z^T] = I, so the random estimate averages to the same term."""
    backend = tiny_model(kind, seed=11)
    backend.model.double()
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    n_features = backend.encode_image(pixels[:1]).shape[1]
    texts = torch.randn(5, n_features, dtype=torch.float64)
    t2i = torch.tensor([0, 0, 1, 2, 2])
    ones = torch.ones(backend.n_layers, backend.n_heads, dtype=torch.float64)
    base = _features(backend, pixels, ones, op)
    hessian = torch.autograd.functional.hessian(
        lambda f: soft_recall_surrogate(f.view_as(base), texts, t2i), base.flatten())
    blocks = [hessian[i * n_features:(i + 1) * n_features, i * n_features:(i + 1) * n_features]
              for i in range(len(pixels))]
    eps = 1e-4
    reference = torch.zeros_like(ones)
    for layer in range(backend.n_layers):
        for head in range(backend.n_heads):
            up, down = ones.clone(), ones.clone()
            up[layer, head] += eps
            down[layer, head] -= eps
            jacobian = (_features(backend, pixels, up, op) - _features(backend, pixels, down, op)) / (2 * eps)
            reference[layer, head] = sum(0.5 * j @ h @ j for j, h in zip(jacobian, blocks, strict=True))
    first = attribution_scan(backend, pixels, texts, t2i, op=op, batch_size=2, order=1)
    n_probes = base.numel()
    basis = iter(torch.eye(n_probes).view(n_probes, *base.shape) * n_probes ** 0.5)
    monkeypatch.setattr(attribution, "_probe", lambda shape, generator: next(basis))
    exact = attribution_scan(backend, pixels, texts, t2i, op=op, batch_size=2, order=2, probes=n_probes)
    torch.testing.assert_close(exact.estimated_delta - first.estimated_delta, reference, rtol=1e-4, atol=1e-9)
    assert (exact.order, exact.probes, first.order, first.probes) == (2, n_probes, 1, 0)


def test_second_order_estimate_is_reproducible_and_checks_its_arguments(tiny_backend, pixels):
    texts = torch.randn(4, tiny_backend.encode_image(pixels[:1]).shape[1], generator=torch.Generator().manual_seed(0))
    t2i = torch.tensor([0, 1, 2, 2])
    a = attribution_scan(tiny_backend, pixels, texts, t2i, seed=3)
    b = attribution_scan(tiny_backend, pixels, texts, t2i, seed=3)
    torch.testing.assert_close(a.estimated_delta, b.estimated_delta)
    for kwargs, message in [({"order": 3}, "order must be 1"), ({"probes": 0}, "at least one probe")]:
        with pytest.raises(clipheads.ClipHeadsError, match=message):
            attribution_scan(tiny_backend, pixels, texts, t2i, **kwargs)
    mask = clipheads.HeadMask.from_heads("L0.H0", tiny_backend)
    with clipheads.ablate(tiny_backend, mask), pytest.raises(clipheads.ClipHeadsError, match="unablated model"):
        attribution_scan(tiny_backend, pixels, texts, t2i)
