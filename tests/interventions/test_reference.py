"""Every operator against a naive reference that builds each head's attention matrix explicitly and edits it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import clipheads
from clipheads.interventions import OPERATORS

_spec = importlib.util.spec_from_file_location("interventions_layer_parts", Path(__file__).with_name("layer_parts.py"))
_layer_parts_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_layer_parts_module)
_layer_parts = _layer_parts_module.layer_parts


def naive_encode(backend, pixels, gates, op: str, alpha: float = 0.0, means=None, maps: list | None = None):
    """Reference forward: explicit softmax(QK^T / sqrt(d)) per head, edited, mixed with the soft gate; each layer's
    edited attention matrices [B, H, T, T] are appended to ``maps`` when given."""
    heads, d = backend.n_heads, backend.head_dim
    x = backend.embed(pixels)
    batch, tokens, width = x.shape
    for layer in range(backend.n_layers):
        ln1, qkv, out_proj, ln2, mlp, ls1, ls2 = _layer_parts(backend, layer)
        q, k, v = (t.view(batch, tokens, heads, d).transpose(1, 2) for t in qkv(ln1(x)))  # [B, H, T, d]
        attn = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)  # [B, H, T, T]
        if op == "identity":
            edited = torch.eye(tokens).expand_as(attn)
        elif op == "cls":
            edited = torch.zeros_like(attn)
            edited[..., 0] = 1.0  # every query attends only to the class token's key
        elif op == "scale":
            edited = alpha * attn
        else:  # zero and mean: the attention contributes nothing, mean adds a constant afterwards
            edited = torch.zeros_like(attn)
        g = gates[layer].view(1, heads, 1, 1)
        if maps is not None:
            maps.append(g * attn + (1 - g) * edited)
        z = (g * attn + (1 - g) * edited) @ v  # [B, H, T, d]
        if op == "mean":  # pooled means [L, H, d] or per-position means [L, H, T, d]
            z = z + (1 - g) * means[layer].view(1, heads, -1, d)
        x = x + ls1(out_proj(z.transpose(1, 2).reshape(batch, tokens, width)))
        x = x + ls2(mlp(ln2(x)))
    return backend.pool(x)


@pytest.mark.parametrize("op", OPERATORS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_operator_matches_naive_reference(tiny_backend, pixels, op, soft):
    torch.manual_seed(0)
    shape = (tiny_backend.n_layers, tiny_backend.n_heads)
    gates = torch.rand(shape) if soft else (torch.rand(shape) > 0.5).float()
    gates[0, 0] = 0.0  # at least one ablated head
    means = torch.randn(*shape, tiny_backend.head_dim) if op == "mean" else None
    mask = clipheads.HeadMask.from_tensor(gates, tiny_backend)
    with torch.no_grad():
        expected = naive_encode(tiny_backend, pixels, gates, op, alpha=0.3, means=means)
        with clipheads.ablate(tiny_backend, mask, op=op, alpha=0.3, means=means):
            got = tiny_backend.encode_image(pixels)
        vanilla = tiny_backend.encode_image(pixels)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - vanilla).abs().max() > 1e-3, "the intervention must change the output"


@pytest.mark.parametrize("op", OPERATORS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_attention_maps_under_ablation_match_naive_reference(tiny_backend, pixels, op, soft):
    """Maps under an ablation are the reference's edited attention matrices: identity -> the identity matrix, cls ->
    the class token's column, zero/mean -> zeros, scale -> alpha times the pattern, mixed by the soft gate."""
    from clipheads.explain.spatial import attention_maps

    torch.manual_seed(0)
    shape = (tiny_backend.n_layers, tiny_backend.n_heads)
    gates = torch.rand(shape) if soft else (torch.rand(shape) > 0.5).float()
    gates[0, 0] = 0.0
    means = torch.randn(*shape, tiny_backend.head_dim) if op == "mean" else None
    mask = clipheads.HeadMask.from_tensor(gates, tiny_backend)
    expected: list[torch.Tensor] = []
    with torch.no_grad():
        naive_encode(tiny_backend, pixels, gates, op, alpha=0.3, means=means, maps=expected)
    got = attention_maps(tiny_backend, pixels, list(range(shape[0])), mask=mask, op=op, alpha=0.3, means=means)
    for layer in range(shape[0]):
        assert (got.weights[:, layer] - expected[layer]).abs().max() <= 1e-5, layer
    if not soft and op != "scale":
        assert torch.equal(got.weights[:, 0, 0], expected[0][:, 0])  # the operator's matrix exactly


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_per_position_means_match_naive_reference(tiny_backend, pixels, soft):
    """The default means: each head's output at each token position becomes its mean at that position."""
    torch.manual_seed(1)
    shape = (tiny_backend.n_layers, tiny_backend.n_heads)
    gates = torch.rand(shape) if soft else (torch.rand(shape) > 0.5).float()
    gates[0, 0] = 0.0
    means = clipheads.compute_head_means(tiny_backend, torch.randn(5, *pixels.shape[1:]))
    assert means.dim() == 4
    mask = clipheads.HeadMask.from_tensor(gates, tiny_backend)
    with torch.no_grad():
        expected = naive_encode(tiny_backend, pixels, gates, "mean", means=means)
        pooled = naive_encode(tiny_backend, pixels, gates, "mean", means=means.mean(dim=2))
        with clipheads.ablate(tiny_backend, mask, op="mean", means=means):
            got = tiny_backend.encode_image(pixels)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - pooled).abs().max() > 1e-3, "per-position and pooled means must differ here"
    with pytest.raises(clipheads.OperatorError, match="token positions"), torch.no_grad(), \
            clipheads.ablate(tiny_backend, mask, op="mean", means=means[:, :, :2]):
        tiny_backend.encode_image(pixels)


def test_naive_reference_with_all_ones_is_the_library(tiny_backend, pixels):
    gates = torch.ones(tiny_backend.n_layers, tiny_backend.n_heads)
    with torch.no_grad():
        expected = naive_encode(tiny_backend, pixels, gates, "identity")
        assert (tiny_backend.encode_image(pixels) - expected).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def tiny_siglip():
    from clipheads.models.random_init import tiny_model

    return tiny_model("siglip")


@pytest.mark.parametrize("op", [op for op in OPERATORS if op != "cls"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_siglip_operator_matches_naive_reference(tiny_siglip, pixels, op, soft):
    """SigLIP (attention-pooling head, no class token): the same reference through its own embed/pool."""
    test_operator_matches_naive_reference(tiny_siglip, pixels, op, soft)


def test_siglip_refuses_the_cls_operator(tiny_siglip):
    """No class token: token 0 is an image patch, so ``cls`` is refused in one line instead of run on it."""
    from clipheads.errors import OperatorError

    with pytest.raises(OperatorError, match="needs a class token") as info:
        clipheads.apply(tiny_siglip, clipheads.HeadMask.from_heads("L0.H0", tiny_siglip), op="cls")
    assert "\n" not in str(info.value) and tiny_siglip.hooked_layers == []


def test_siglip_naive_reference_with_all_ones_is_the_library(tiny_siglip, pixels):
    test_naive_reference_with_all_ones_is_the_library(tiny_siglip, pixels)
