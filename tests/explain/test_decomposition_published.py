"""The ``textspan`` convention is the published decomposition (clip_text_span ``prs_hook.py``), on both backends.

The reference below re-implements the published definition literally and independently of clipheads' hooks: it
runs every block by hand from the library's weights, records the class token's attention output per source token
and head plus ``out_proj.bias / (n * h)`` (``PRSLogger.compute_attentions``), the MLP outputs and the ``ln_pre``
output (``compute_mlps``), the final residual's mean and std (``log_post_ln_mean``/``_std``), and then follows
``_normalize_attentions``, ``_normalize_mlps`` and ``finalize`` line by line.
"""

from __future__ import annotations

import copy

import pytest
import torch

from clipheads.errors import ClipHeadsError
from clipheads.explain.decomposition import decompose
from clipheads.models import as_backend
from clipheads.models.random_init import random_hf_clip, tiny_open_clip


def _with_nonzero_biases(backend):
    """A copy whose biases and layer-norm parameters are random (random init leaves them 0 and 1)."""
    model = copy.deepcopy(backend.model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or ("ln" in name or "norm" in name):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=g))
    return as_backend(model)


@pytest.fixture(scope="module", params=["hf", "open_clip"])
def model(request):
    return _with_nonzero_biases(random_hf_clip("tiny") if request.param == "hf" else tiny_open_clip())


@pytest.fixture()
def images():
    torch.manual_seed(5)
    return torch.randn(5, 3, 32, 32)


def _parts(backend):
    """The modules the published code reads, by library."""
    if hasattr(backend.model, "vision_model"):
        vision = backend.model.vision_model
        blocks = [(b.layer_norm1, b.self_attn.q_proj.weight, b.self_attn.q_proj.bias, b.self_attn.k_proj.weight,
                   b.self_attn.k_proj.bias, b.self_attn.v_proj.weight, b.self_attn.v_proj.bias, b.self_attn.out_proj,
                   b.layer_norm2, b.mlp) for b in vision.encoder.layers]
        return blocks, vision.post_layernorm, backend.model.visual_projection.weight.T
    visual = backend.model.visual
    blocks = []
    for b in visual.transformer.resblocks:
        assert isinstance(b.ls_1, torch.nn.Identity) and isinstance(b.ls_2, torch.nn.Identity)
        wq, wk, wv = b.attn.in_proj_weight.chunk(3)
        bq, bk, bv = b.attn.in_proj_bias.chunk(3)
        blocks.append((b.ln_1, wq, bq, wk, bk, wv, bv, b.attn.out_proj, b.ln_2, b.mlp))
    return blocks, visual.ln_post, visual.proj


@torch.no_grad()
def published_decomposition(backend, pixels):
    """``(projected_attentions [b, l, n, h, D], projected_mlps [b, l + 1, D])`` as ``PRSLogger.finalize`` returns."""
    blocks, ln_post, proj = _parts(backend)
    h = backend.n_heads
    x = backend.embed(pixels)  # the ln_pre output: "visual.ln_pre_post"
    attentions, mlps = [], [x[:, 0]]
    for ln_1, wq, bq, wk, bk, wv, bv, out_proj, ln_2, mlp in blocks:
        y = ln_1(x)
        b, n, width = y.shape
        q, k, v = ((y @ w.T + bias).view(b, n, h, -1).transpose(1, 2) for w, bias in ((wq, bq), (wk, bk), (wv, bv)))
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [b, h, n, n]
        w_o = out_proj.weight.view(width, h, -1)  # [W, h, d]
        ret = torch.einsum("bhn,bhnd,whd->bnhw", attn[:, :, 0], v, w_o)  # class token, per source token and head
        attentions.append(ret + out_proj.bias[None, None, None] / (ret.shape[1] * ret.shape[2]))
        x = x + (attn @ v).transpose(1, 2).reshape(b, n, width) @ out_proj.weight.T + out_proj.bias
        out = mlp(ln_2(x))
        mlps.append(out[:, 0])
        x = x + out
    residual = x[:, 0]
    post_ln_mean = residual.mean(dim=-1, keepdim=True)  # [b, 1]
    post_ln_std = torch.sqrt(residual.var(dim=-1, unbiased=False, keepdim=True) + ln_post.eps)  # [b, 1]
    attentions = torch.stack(attentions, axis=1)  # [b, l, n, h, d]
    mlps = torch.stack(mlps, axis=1)  # [b, l + 1, d]
    # _normalize_attentions
    len_intermediates = attentions.shape[1] + mlps.shape[1]  # 2 * l + 1
    normalization_term = attentions.shape[2] * attentions.shape[3]  # n * h
    mean_centered = attentions - post_ln_mean[:, :, None, None, None] / (len_intermediates * normalization_term)
    weighted_mean_centered = ln_post.weight * mean_centered
    weighted_mean_by_std = weighted_mean_centered / post_ln_std[:, :, None, None, None]
    bias_term = ln_post.bias / (len_intermediates * normalization_term)
    projected_attentions = (weighted_mean_by_std + bias_term) @ proj
    # _normalize_mlps
    mean_centered = mlps - post_ln_mean[:, :, None] / len_intermediates
    weighted_mean_by_std = ln_post.weight * mean_centered / post_ln_std[:, :, None]
    projected_mlps = (weighted_mean_by_std + ln_post.bias / len_intermediates) @ proj
    # finalize
    norm = backend.encode_image(pixels).norm(dim=-1)
    return projected_attentions / norm[:, None, None, None, None], projected_mlps / norm[:, None, None]


def test_head_terms_are_the_published_ones(model, images):
    attentions, mlps = published_decomposition(model, images)
    parts = decompose(model, images)  # default: convention="textspan"
    assert parts.convention == "textspan"
    expected = attentions.sum(dim=2)  # [b, l, h, D]: each head's term, summed over source tokens
    assert parts.heads.shape == expected.shape
    assert (parts.heads - expected).abs().max() < 1e-6
    assert (parts.embedding - mlps[:, 0]).abs().max() < 1e-6
    assert (parts.mlp - mlps[:, 1:]).abs().max() < 1e-6
    # the biases matter here: the centred convention gives different head terms
    assert (decompose(model, images, convention="centred").heads - expected).abs().max() > 1e-3


def test_components_sum_to_the_normalised_embedding(model, images):
    attentions, mlps = published_decomposition(model, images)
    embedding = model.encode_image(images)
    unit = embedding / embedding.norm(dim=-1, keepdim=True)
    assert torch.allclose(attentions.sum(dim=(1, 2, 3)) + mlps.sum(dim=1), unit, atol=1e-6)  # the reference
    parts = decompose(model, images)
    assert torch.allclose(parts.total(), unit, atol=1e-6)
    assert parts.ln_bias.abs().max() == 0 and parts.attention_bias().abs().max() < 1e-6
    centred = decompose(model, images, convention="centred")
    assert torch.allclose(centred.total(), embedding, atol=1e-4)


def test_unknown_convention_is_refused(model, images):
    with pytest.raises(ClipHeadsError, match="unknown decomposition convention 'paper'"):
        decompose(model, images, convention="paper")
