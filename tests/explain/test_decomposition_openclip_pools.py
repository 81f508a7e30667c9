"""The head decomposition of open_clip ``VisionTransformer`` towers that pool without a class token: CLIPA (the mean of
the patch tokens, then ``ln_post`` and ``proj``) and CoCa (``AttentionalPooler``: query 0 over ``ln_k(tokens)``, then
``ln_post`` and ``proj``, through ``AttentionPool.from_open_clip``), in both conventions, against a naive reference
that builds every head's attention matrix explicitly and reads the pool literally; ``describe`` on each through the
CLI; the layouts it does not read refused in one line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipheads
from clipheads.errors import ClipHeadsError
from clipheads.explain.decomposition import decompose
from clipheads.explain.spatial import spatial_decomposition
from clipheads.models import as_backend
from clipheads.models.tiny_copies import tiny_open_clip_copy


def _with_biases(backend):
    """A copy whose norms and attention biases are random (open_clip initialises them to 1 and 0, which would leave
    the bias terms of the reference untested)."""
    model = copy.deepcopy(backend.model)
    torch.manual_seed(2)
    with torch.no_grad():
        for module in model.visual.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, torch.nn.MultiheadAttention):
                module.in_proj_bias.normal_(0.0, 0.2)
                module.out_proj.bias.normal_(0.0, 0.2)
    return as_backend(model)


@pytest.fixture(scope="module")
def clipa():
    return _with_biases(tiny_open_clip_copy("ViT-L-14-CLIPA"))


@pytest.fixture(scope="module")
def coca():
    """Keys and values 64 wide, queries 48 (``kdim != embed_dim``, as in the real coca_ViT-B-32: 768 -> 512)."""
    return _with_biases(tiny_open_clip_copy("coca_ViT-B-32", embed_dim=48))


@pytest.fixture()
def images():
    torch.manual_seed(5)
    return torch.randn(3, 3, 32, 32)


@torch.no_grad()
def naive_terms(backend, pixels):
    """The last residual stream ``[B, T, W]`` as a sum of terms, each head's softmax(q k^T / sqrt(d)) built by hand
    from the block's ``nn.MultiheadAttention`` weights."""
    visual = backend.model.visual
    x = visual._embeds(pixels)
    terms = {"embedding": x}
    for layer, block in enumerate(visual.transformer.resblocks):
        attn = block.attn
        h = block.ln_1(x)
        n, t, _ = h.shape
        d = attn.head_dim
        q, k, v = (part.reshape(n, t, attn.num_heads, d)
                   for part in F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
        written = torch.zeros_like(x)
        for head in range(attn.num_heads):
            a = torch.softmax(q[:, :, head] @ k[:, :, head].transpose(1, 2) * d ** -0.5, dim=-1)
            terms[(layer, head)] = block.ls_1((a @ v[:, :, head]) @ attn.out_proj.weight[:, head * d:(head + 1) * d].T)
            written = written + terms[(layer, head)]
        terms[("bias", layer)] = block.ls_1(attn.out_proj.bias.expand_as(x))
        middle = x + written + terms[("bias", layer)]
        terms[("mlp", layer)] = block.ls_2(block.mlp(block.ln_2(middle)))
        x = middle + terms[("mlp", layer)]
    return terms, x


def _check(parts, reference, terms, backend, convention, scale_floor=1e-2):
    """Every head and MLP term of ``parts`` equals ``reference(term, share)``; under textspan a head carries its share
    of the ``out_proj`` bias, as published."""
    shares, n_heads = 2 * backend.n_layers + 1, backend.n_heads
    scale = parts.heads.abs().max()
    assert scale > scale_floor
    for layer in range(backend.n_layers):
        for head in range(n_heads):
            term, share = terms[(layer, head)], 1
            if convention == "textspan":
                term, share = term + terms[("bias", layer)] / n_heads, shares * n_heads
            assert (parts.heads[:, layer, head] - reference(term, share)).abs().max() <= 1e-5 * scale
        assert (parts.mlp[:, layer] - reference(terms[("mlp", layer)], shares)).abs().max() <= 1e-5 * scale
    assert (parts.embedding - reference(terms["embedding"], shares)).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("convention", ["centred", "textspan"])
def test_clipa_terms_equal_the_naive_average_pool_and_sum_to_the_embedding(clipa, images, convention):
    """CLIPA (``pool_type='avg'``, ``final_ln_after_pool``): the embedding is ``ln_post(mean_t>=1 x_t) @ proj``, so a
    term is its mean over the patch tokens through ``ln_post`` frozen at the pooled vector's statistics."""
    terms, x = naive_terms(clipa, images)
    visual = clipa.model.visual
    norm, proj = visual.ln_post, visual.proj
    pooled = x[:, 1:].mean(1)
    mean = pooled.mean(-1, keepdim=True)
    std = torch.sqrt(pooled.var(-1, unbiased=False, keepdim=True) + norm.eps)
    with torch.no_grad():
        embedding = clipa.encode_image(images)
        assert (norm(pooled) @ proj - embedding).abs().max() <= 1e-5 * embedding.abs().max()  # the reference is it

        def reference(c, share):
            c = c[:, 1:].mean(1)
            if convention == "centred":
                return (norm.weight * (c - c.mean(-1, keepdim=True)) / std) @ proj
            post = norm.weight * (c - mean / share) / std + norm.bias / share
            return (post @ proj) / embedding.norm(dim=-1, keepdim=True)

        parts = decompose(clipa, images, convention=convention)
        total = embedding if convention == "centred" else F.normalize(embedding, dim=-1)
        assert (parts.total() - total).abs().max() <= 1e-5 * total.abs().max()
        assert parts.readout is None
        _check(parts, reference, terms, clipa, convention)
        if convention == "centred":
            assert (parts.ln_bias - norm.bias @ proj).abs().max() <= 1e-6 * proj.abs().max()


@torch.no_grad()
def _coca_reference(coca, x):
    """CoCa's pool read literally: ``ln_k`` per token, query 0 of ``ln_q(query)`` per pooling head over the keys,
    values per pooling head, ``out_proj``; returns the patterns, ``through`` and the pooled vector."""
    pooler = coca.model.visual.attn_pool
    attn, ln_k = pooler.attn, pooler.ln_k
    width, n_pool = attn.embed_dim, attn.num_heads
    d = width // n_pool
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    query = pooler.ln_q(pooler.query)[0] @ attn.q_proj_weight.T + b_q
    keys = ln_k(x) @ attn.k_proj_weight.T + b_k
    patterns = [torch.softmax(keys[..., g * d:(g + 1) * d] @ query[g * d:(g + 1) * d] * d ** -0.5, dim=-1)
                for g in range(n_pool)]  # [B, T] each

    def through(post):  # normed per-token values [B, T, W] -> their part of the pooled vector [B, E]
        out = 0
        for g, a in enumerate(patterns):
            value = post @ attn.v_proj_weight[g * d:(g + 1) * d].T
            out = out + (a[..., None] * value).sum(1) @ attn.out_proj.weight[:, g * d:(g + 1) * d].T
        return out

    value_out_bias = attn.out_proj.bias + b_v @ attn.out_proj.weight.T
    pooled = through(ln_k(x)) + value_out_bias
    return through, value_out_bias, pooled


@pytest.mark.parametrize("convention", ["centred", "textspan"])
def test_coca_terms_equal_the_naive_attentional_pool_and_sum_to_the_embedding(coca, images, convention):
    """CoCa: query 0 of the pooler is a fixed probe over ``ln_k(tokens)`` (pattern and per-token statistics frozen per
    image), then ``ln_post`` (frozen at the pooled vector's statistics) and ``proj``."""
    terms, x = naive_terms(coca, images)
    visual = coca.model.visual
    ln_k, ln_post, proj = visual.attn_pool.ln_k, visual.ln_post, visual.proj
    through, value_out_bias, pooled = _coca_reference(coca, x)
    mean_t = x.mean(-1, keepdim=True)
    std_t = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln_k.eps)
    mean_p = pooled.mean(-1, keepdim=True)
    std_p = torch.sqrt(pooled.var(-1, unbiased=False, keepdim=True) + ln_post.eps)
    with torch.no_grad():
        embedding = coca.encode_image(images)
        assert (ln_post(pooled) @ proj - embedding).abs().max() <= 1e-5 * embedding.abs().max()  # the reference is it

        def reference(c, share):
            if convention == "centred":
                out = through(ln_k.weight * (c - c.mean(-1, keepdim=True)) / std_t)
                return (ln_post.weight * (out - out.mean(-1, keepdim=True)) / std_p) @ proj
            out = through(ln_k.weight * (c - mean_t / share) / std_t + ln_k.bias / share) + value_out_bias / share
            post = ln_post.weight * (out - mean_p / share) / std_p + ln_post.bias / share
            return (post @ proj) / embedding.norm(dim=-1, keepdim=True)

        parts = decompose(coca, images, convention=convention)
        total = embedding if convention == "centred" else F.normalize(embedding, dim=-1)
        assert (parts.total() - total).abs().max() <= 1e-5 * total.abs().max()
        _check(parts, reference, terms, coca, convention)
        scale = parts.heads.abs().max()
        if convention == "centred":  # the pooler's biases through the frozen ln_post: a term of no head, per image
            constant = through(ln_k.bias.expand_as(x)) + value_out_bias
            readout = (ln_post.weight * (constant - constant.mean(-1, keepdim=True)) / std_p) @ proj
            assert readout.abs().max() > 1e-2
            assert (parts.readout - readout).abs().max() <= 1e-5 * scale
            assert (parts.ln_bias - ln_post.bias @ proj).abs().max() <= 1e-5 * scale
        else:
            assert parts.readout.abs().max() == 0 and parts.ln_bias.abs().max() == 0


@pytest.mark.parametrize("convention", ["centred", "textspan"])
def test_coca_spatial_terms_sum_over_tokens_to_the_head_terms(coca, images, convention):
    """The same frozen pool split over the tokens (``spatial_decomposition``): each head's token terms add up to its
    term in the decomposition."""
    heads = ["L0.H1", "L1.H3"]
    maps = spatial_decomposition(coca, images, heads, convention=convention)
    parts = decompose(coca, images, convention=convention)
    scale = parts.heads.abs().max()
    for i, (layer, head) in enumerate([(0, 1), (1, 3)]):
        assert (maps.terms[:, i].sum(1) - parts.heads[:, layer, head]).abs().max() <= 1e-5 * scale


def test_clipa_spatial_maps_are_refused_in_one_line(clipa, images):
    with pytest.raises(ClipHeadsError, match="averages its patch tokens") as err:
        spatial_decomposition(clipa, images, "L1.H0")
    assert "\n" not in str(err.value)


def test_pool_layouts_it_does_not_read_are_refused_in_one_line(images):
    """An average pool before ``ln_post`` (``final_ln_after_pool=False``) and CoCa's pooler read through several
    queries (``pool_type='avg'`` after it): one line each, no hook left behind."""
    clipa = tiny_open_clip_copy("ViT-L-14-CLIPA")
    model = copy.deepcopy(clipa.model)
    model.visual.final_ln_after_pool = False
    backend = as_backend(model)
    with pytest.raises(ClipHeadsError, match="after ln_post") as err:
        decompose(backend, images)
    assert "\n" not in str(err.value) and backend.hooked_layers == []
    coca = tiny_open_clip_copy("coca_ViT-B-32")
    model = copy.deepcopy(coca.model)
    model.visual.pool_type = "avg"
    backend = as_backend(model)
    with pytest.raises(ClipHeadsError, match="one query") as err:
        decompose(backend, images)
    assert "\n" not in str(err.value) and backend.hooked_layers == []


@pytest.mark.parametrize("config", ["ViT-L-14-CLIPA", "coca_ViT-B-32"])
def test_describe_runs_through_the_cli(config, tmp_path, run_main):
    folder = clipheads.save(tiny_open_clip_copy(config), tmp_path / "model")
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "images" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "a" / f"{i}.png")
    code, out, err = run_main("describe", "--model", folder, "--data", tmp_path / "images", "--k", 2, "--layers", 1,
                              "--batch-size", 4, "--out", tmp_path / "out")
    assert code == 0, err
    described = json.loads((tmp_path / "out" / "descriptions.json").read_text())
    assert [h["head"] for h in described["heads"]] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert described["n_images"] == 6 and all(len(h["texts"]) == 2 for h in described["heads"])
