"""The head decomposition of open_clip towers on timm trunks: SigLIP (``AttentionPoolLatent``, through
``AttentionPool.from_timm``) and EVA01 (class token), against a naive reference that builds every head's attention
matrix explicitly and reads the pool or the final LayerNorm literally; EVA02's sub-LN and EVA02-E's post-norm blocks
refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from clipheads.errors import ClipHeadsError
from clipheads.explain.decomposition import decompose
from clipheads.models import as_backend
from clipheads.models.tiny_copies import tiny_timm_open_clip


def _scaled(config: str):
    """A tiny copy whose linear weights have std ``1/sqrt(fan_in)`` (timm's init gives heads terms of ~1e-4, too
    small for a 1e-5 comparison to mean anything)."""
    backend = tiny_timm_open_clip(config, seed=1)
    model = copy.deepcopy(backend.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.visual.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.weight.shape[1] ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
    return as_backend(model)


@pytest.fixture(scope="module")
def siglip():
    return _scaled("ViT-B-16-SigLIP")


@pytest.fixture(scope="module")
def eva01():
    return _scaled("EVA01-g-14")


@pytest.fixture()
def images():
    torch.manual_seed(4)
    return torch.randn(3, 3, 32, 32)


@torch.no_grad()
def naive_terms(backend, pixels):
    """The last residual stream as a sum of terms ``[B, T, W]``, each head's softmax(q k^T / sqrt(d)) built by hand
    (timm ViT blocks, or EVA01's packed qkv with q/v biases; no rope in these two)."""
    trunk = backend.model.visual.trunk
    x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels)) if type(trunk).__name__ != "Eva"
                       else trunk._pos_embed(trunk.patch_embed(pixels))[0])
    terms = {"embedding": x}
    for layer, block in enumerate(trunk.blocks):
        attn = block.attn
        h = block.norm1(x)
        n, t, _ = h.shape
        bias = (torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if getattr(attn, "q_bias", None) is not None
                else attn.qkv.bias)
        q, k, v = (part.reshape(n, t, attn.num_heads, attn.head_dim)
                   for part in F.linear(h, attn.qkv.weight, bias).chunk(3, dim=-1))
        q, k = attn.q_norm(q.transpose(1, 2)).transpose(1, 2), attn.k_norm(k.transpose(1, 2)).transpose(1, 2)
        gamma = getattr(block, "gamma_1", None)
        scale = block.ls1 if hasattr(block, "ls1") else (lambda y, g=gamma: y if g is None else g * y)
        written = torch.zeros_like(x)
        for head in range(attn.num_heads):
            a = torch.softmax(q[:, :, head] @ k[:, :, head].transpose(1, 2) * attn.head_dim ** -0.5, dim=-1)
            cols = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
            terms[(layer, head)] = scale((a @ v[:, :, head]) @ attn.proj.weight[:, cols].T)
            written = written + terms[(layer, head)]
        terms[("bias", layer)] = scale(attn.proj.bias.expand_as(x))
        middle = x + written + terms[("bias", layer)]
        mlp = block.mlp(block.norm2(middle))
        if hasattr(block, "ls2"):
            mlp = block.ls2(mlp)
        elif block.gamma_2 is not None:
            mlp = block.gamma_2 * mlp
        terms[("mlp", layer)] = mlp
        x = middle + terms[("mlp", layer)]
    return terms, x


def test_timm_siglip_centred_terms_equal_the_naive_pool_and_sum_to_the_embedding(siglip, images):
    terms, x = naive_terms(siglip, images)
    trunk = siglip.model.visual.trunk
    norm, pool = trunk.norm, trunk.attn_pool
    heads, d = pool.num_heads, pool.head_dim
    width = heads * d
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    with torch.no_grad():
        query = pool.q(pool.latent[0, 0])  # one latent; q_norm is the identity here
        keys = pool.kv(norm(x))[..., :width]
        patterns = [torch.softmax(keys[..., g * d:(g + 1) * d] @ query[g * d:(g + 1) * d] * d ** -0.5, dim=-1)
                    for g in range(heads)]

        def through(post):  # normed per-token values [B, T, W] -> their part of the pooled vector [B, D]
            out = 0
            for g, a in enumerate(patterns):
                value = post @ pool.kv.weight[width + g * d:width + (g + 1) * d].T
                out = out + (a[..., None] * value).sum(1) @ pool.proj.weight[:, g * d:(g + 1) * d].T
            return out

        def centred(c):
            return through(norm.weight * (c - c.mean(-1, keepdim=True)) / std)

        constant = through(norm.bias.expand_as(x)) + pool.proj.bias + sum(
            pool.kv.bias[width + g * d:width + (g + 1) * d] @ pool.proj.weight[:, g * d:(g + 1) * d].T
            for g in range(heads))
        pooled = constant + sum(centred(c) for c in terms.values())
        embedding = siglip.encode_image(images)
        readout = pool.mlp(pool.norm(pooled))
    assert (pooled + readout - embedding).abs().max() <= 1e-5 * embedding.abs().max()  # the reference is the model
    parts = decompose(siglip, images, convention="centred")
    assert (parts.total() - embedding).abs().max() <= 1e-5 * embedding.abs().max()
    scale = parts.heads.abs().max()
    assert scale > 1e-2
    for layer in range(siglip.n_layers):
        for head in range(siglip.n_heads):
            assert (parts.heads[:, layer, head] - centred(terms[(layer, head)])).abs().max() <= 1e-5 * scale
        assert (parts.mlp[:, layer] - centred(terms[("mlp", layer)])).abs().max() <= 1e-5 * scale
    assert (parts.ln_bias - constant).abs().max() <= 1e-5 * scale
    assert (parts.readout - readout).abs().max() <= 1e-5 * scale


def test_timm_siglip_textspan_terms_sum_to_the_normalised_embedding(siglip, images):
    parts = decompose(siglip, images, convention="textspan")
    with torch.no_grad():
        embedding = siglip.encode_image(images, normalize=True)
    assert (parts.total() - embedding).abs().max() <= 1e-5 and parts.ln_bias.abs().max() == 0
    assert parts.heads.abs().max() > 1e-2 and parts.readout is not None


@pytest.mark.parametrize("convention", ["centred", "textspan"])
def test_eva01_class_token_terms_equal_the_naive_reference(eva01, images, convention):
    """EVA01 (class token, no rope, packed qkv with q/v biases): the final LayerNorm at token 0 linearised with the
    image's own statistics, then the trunk's linear head."""
    terms, x = naive_terms(eva01, images)
    trunk = eva01.model.visual.trunk
    norm, head = trunk.norm, trunk.head
    cls = x[:, 0]
    mean = cls.mean(-1, keepdim=True)
    std = torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + norm.eps)
    with torch.no_grad():
        embedding = eva01.encode_image(images)
    parts = decompose(eva01, images, convention=convention)
    shares, n_heads = 2 * eva01.n_layers + 1, eva01.n_heads

    def reference(c, share):
        c = c[:, 0]
        if convention == "centred":
            return (norm.weight * (c - c.mean(-1, keepdim=True)) / std) @ head.weight.T
        post = norm.weight * (c - mean / share) / std + norm.bias / share
        return (post @ head.weight.T + head.bias / share) / embedding.norm(dim=-1, keepdim=True)

    total = embedding if convention == "centred" else torch.nn.functional.normalize(embedding, dim=-1)
    assert (parts.total() - total).abs().max() <= 1e-5 * total.abs().max()
    scale = parts.heads.abs().max()
    assert scale > 1e-2
    with torch.no_grad():
        for layer in range(eva01.n_layers):
            for h in range(n_heads):
                term, share = terms[(layer, h)], 1
                if convention == "textspan":  # the out_proj bias shared over the heads, as published
                    term, share = term + terms[("bias", layer)] / n_heads, shares * n_heads
                assert (parts.heads[:, layer, h] - reference(term, share)).abs().max() <= 1e-5 * scale
            assert (parts.mlp[:, layer] - reference(terms[("mlp", layer)], shares)).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize(("config", "reason"), [("EVA02-B-16", "sub-LN"), ("EVA02-E-14", "post-norm")])
def test_non_additive_eva02_heads_are_refused_in_one_line(config, reason, images):
    backend = tiny_timm_open_clip(config)
    with pytest.raises(ClipHeadsError, match=reason) as err:
        decompose(backend, images)
    assert "\n" not in str(err.value) and backend.hooked_layers == []


def test_a_timm_pool_followed_by_a_projection_is_refused_in_one_line(images):
    """open_clip's ``timm_proj='linear'`` after the attention pool: the pool's read-out term would not be in the
    embedding's space, so the decomposition says so instead of mixing spaces."""
    backend = tiny_timm_open_clip("ViT-B-16-SigLIP")
    model = copy.deepcopy(backend.model)
    model.visual.head = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ClipHeadsError, match="followed by Linear") as err:
        decompose(as_backend(model), images)
    assert "\n" not in str(err.value)
