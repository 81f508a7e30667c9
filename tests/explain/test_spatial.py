"""Attention maps and the per-token (spatial) decomposition on tiny models of both backends."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.explain import decompose
from clipheads.explain.spatial import attention_maps, spatial_decomposition
from clipheads.interventions import record_head_outputs


@pytest.mark.parametrize("convention", ["textspan", "centred"])
def test_token_terms_sum_to_the_head_term(tiny_backend, pixels, convention):
    heads = [(0, 1), (1, 0), (1, 3)]
    maps = spatial_decomposition(tiny_backend, pixels, heads, convention=convention)
    full = decompose(tiny_backend, pixels, convention=convention)
    assert maps.terms.shape[:2] == (pixels.shape[0], 3) and maps.heads == ["L0.H1", "L1.H0", "L1.H3"]
    for k, (layer, head) in enumerate(heads):
        expected = full.heads[:, full.layers.index(layer), head]
        assert torch.allclose(maps.terms[:, k].sum(dim=1), expected, atol=1e-5, rtol=1e-4), (layer, head)
    # the split is not trivial: several tokens carry a share, and they differ
    assert (maps.terms[:, 0].norm(dim=-1) > 1e-6).sum(dim=1).min() > 1


def test_projection_and_grid(tiny_backend, pixels):
    maps = spatial_decomposition(tiny_backend, pixels, "L1.H2")
    direction = torch.randn(maps.terms.shape[-1])
    values = maps.project(direction)
    assert values.shape == maps.terms.shape[:3]
    assert torch.allclose(values.sum(-1), maps.terms.sum(2) @ (direction / direction.norm()), atol=1e-5)
    grid = maps.grid(values)
    side = int((maps.terms.shape[2] - 1) ** 0.5)
    assert grid.shape == (pixels.shape[0], 1, side, side)
    assert torch.equal(grid.flatten(2), values[..., 1:])


def test_attention_maps_reproduce_the_head_outputs(tiny_backend, pixels):
    """softmax(q k^T) @ v from the maps equals the per-head outputs the model computes itself (both layers)."""
    layers = list(range(tiny_backend.n_layers))
    maps = attention_maps(tiny_backend, pixels, layers)
    recorded = record_head_outputs(tiny_backend, pixels, layers)
    n, s, h, t, _ = maps.weights.shape
    assert (n, s, h) == (pixels.shape[0], len(layers), tiny_backend.n_heads)
    assert torch.allclose(maps.weights.sum(-1), torch.ones(n, s, h, t), atol=1e-5)
    x = tiny_backend.embed(pixels)
    from clipheads.explain.spatial import _qkv
    with torch.no_grad():
        for layer in layers:
            _, _, v, _ = _qkv(tiny_backend, layer, x)
            z = maps.weights[:, layer] @ v  # [N, H, T, d]
            assert torch.allclose(z.transpose(1, 2), recorded[layer], atol=1e-5)
            x = tiny_backend.run_layers(x, layer, layer + 1)
    assert maps.cls_row(1, 0).shape[0] == pixels.shape[0]


def test_attention_maps_with_an_ablation(tiny_backend, pixels):
    """Zero-ablating layer 0 makes its maps zero (the heads read no token) and changes layer 1's; only the requested
    layer is returned."""
    mask = clipheads.HeadMask.from_layers(0, tiny_backend)
    plain = attention_maps(tiny_backend, pixels, [0, 1])
    ablated = attention_maps(tiny_backend, pixels, "0,1", mask=mask, op="zero")
    assert torch.equal(ablated.weights[:, 0], torch.zeros_like(plain.weights[:, 0]))
    assert (plain.weights[:, 1] - ablated.weights[:, 1]).abs().max() > 1e-4
    assert ablated.ablated == mask.ablated and not plain.ablated
    assert not tiny_backend.hooked_layers
    only = attention_maps(tiny_backend, pixels, [1])
    assert only.layers == [1] and torch.allclose(only.weights[:, 0], plain.weights[:, 1], atol=1e-6)


def test_bad_heads_are_refused(tiny_backend, pixels):
    with pytest.raises(clipheads.ClipHeadsError, match="not a head"):
        spatial_decomposition(tiny_backend, pixels, "L9.H0")
    with pytest.raises(clipheads.ClipHeadsError, match="convention"):
        spatial_decomposition(tiny_backend, pixels, "L0.H0", convention="other")


def test_attention_maps_stop_after_the_last_requested_layer(tiny_backend, pixels):
    calls = []
    handle = tiny_backend.attention_module(tiny_backend.n_layers - 1).register_forward_hook(
        lambda *_: calls.append(1))
    try:
        attention_maps(tiny_backend, pixels, [0])
        assert not calls, "the last layer ran although only layer 0 was requested"
        attention_maps(tiny_backend, pixels, [tiny_backend.n_layers - 1])
        assert calls
    finally:
        handle.remove()
