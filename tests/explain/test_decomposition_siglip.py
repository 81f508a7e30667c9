"""The head decomposition of SigLIP and SigLIP 2 (fixed grid; attention-pooling head, no class token) against a naive
reference that builds every attention matrix explicitly, and its terms summing to the embedding in both conventions."""

from __future__ import annotations

import copy

import pytest
import torch

import clipheads
from clipheads.explain.decomposition import decompose, decompose_batches
from clipheads.explain.spatial import attention_maps, spatial_decomposition
from clipheads.models import as_backend
from clipheads.models.random_init import tiny_model


@pytest.fixture(scope="module")
def siglip():
    return tiny_model("siglip", seed=3)


@pytest.fixture(scope="module")
def siglip2():
    return tiny_model("siglip2", seed=3)


@pytest.fixture(params=["siglip", "siglip2"])
def family(request):
    """SigLIP and SigLIP 2 (its fixed grid: ``embed`` lays the square image out as NaFlex patches)."""
    return request.getfixturevalue(request.param)


@pytest.fixture()
def images():
    torch.manual_seed(3)
    return torch.randn(5, 3, 32, 32)


@torch.no_grad()
def naive(model, pixels):
    """Every term of the last residual stream token by token, each head's attention matrix built by hand, and the
    pooling head read literally: ``post_layernorm`` frozen at each token's statistics, the probe's softmax over the
    tokens per pooling head, ``out_proj`` per pooling head; the pooling MLP on the pooled vector."""
    vision = model.model.vision_model
    x = model.embed(pixels)  # SigLIP: vision.embeddings(pixels); SigLIP 2: the same on its NaFlex patches
    terms = {"embedding": x}
    for layer, block in enumerate(vision.encoder.layers):
        attn = block.self_attn
        h = block.layer_norm1(x)
        n, t, _ = h.shape
        q, k, v = (proj(h).view(n, t, attn.num_heads, attn.head_dim) for proj in (attn.q_proj, attn.k_proj,
                                                                                   attn.v_proj))
        written = torch.zeros_like(x)
        for head in range(attn.num_heads):
            a = torch.softmax(q[:, :, head] @ k[:, :, head].transpose(1, 2) * attn.scale, dim=-1)  # [n, t, t]
            block_weight = attn.out_proj.weight[:, head * attn.head_dim:(head + 1) * attn.head_dim]
            terms[(layer, head)] = (a @ v[:, :, head]) @ block_weight.T
            written = written + terms[(layer, head)]
        terms[("bias", layer)] = attn.out_proj.bias.expand_as(x)
        middle = x + written + attn.out_proj.bias
        terms[("mlp", layer)] = block.mlp(block.layer_norm2(middle))
        x = middle + terms[("mlp", layer)]
    norm, pool = vision.post_layernorm, vision.head
    mha = pool.attention
    width, n_pool = mha.embed_dim, mha.num_heads
    d = width // n_pool
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    mean = x.mean(-1, keepdim=True)
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    query = pool.probe[0, 0] @ w_q.T + b_q
    keys = norm(x) @ w_k.T + b_k
    patterns = [torch.softmax(keys[..., g * d:(g + 1) * d] @ query[g * d:(g + 1) * d] / d ** 0.5, dim=-1)
                for g in range(n_pool)]  # [n, t] each

    def through(post):  # post-norm values [n, t, W] -> the pooled vector's part [n, D]
        out = 0
        for g, a in enumerate(patterns):
            value = post @ w_v[g * d:(g + 1) * d].T
            out = out + (a[..., None] * value).sum(1) @ mha.out_proj.weight[:, g * d:(g + 1) * d].T
        return out

    constant = through(norm.bias.expand_as(x)) + mha.out_proj.bias + sum(
        b_v[g * d:(g + 1) * d] @ mha.out_proj.weight[:, g * d:(g + 1) * d].T for g in range(n_pool))
    pooled = constant + sum(through(norm.weight * (c - c.mean(-1, keepdim=True)) / std) for c in terms.values())
    library_pooled = mha(pool.probe.expand(len(x), -1, -1), norm(x), norm(x))[0][:, 0]
    readout = pool.mlp(pool.layernorm(pooled))
    return terms, through, dict(mean=mean, std=std, constant=constant, pooled=pooled, library=library_pooled,
                                readout=readout, embedding=pooled + readout, norm=norm)


def test_centred_terms_equal_the_naive_reference_and_sum_to_the_embedding(family, images):
    terms, through, ref = naive(family, images)
    assert (ref["pooled"] - ref["library"]).abs().max() <= 1e-5  # the reference reads the pool as the library does
    parts = decompose(family, images, convention="centred")
    with torch.inference_mode():
        embedding = family.encode_image(images)
    assert (parts.total() - embedding).abs().max() <= 1e-5
    gamma, std = ref["norm"].weight, ref["std"]

    def centred(c):
        return through(gamma * (c - c.mean(-1, keepdim=True)) / std)

    for layer in range(family.n_layers):
        for head in range(family.n_heads):
            assert (parts.heads[:, layer, head] - centred(terms[(layer, head)])).abs().max() <= 1e-5
        assert (parts.mlp[:, layer] - centred(terms[("mlp", layer)])).abs().max() <= 1e-5
        assert (parts.attention_bias()[:, layer] - centred(terms[("bias", layer)])).abs().max() <= 1e-5
    assert (parts.embedding - centred(terms["embedding"])).abs().max() <= 1e-5
    assert (parts.ln_bias - ref["constant"]).abs().max() <= 1e-5
    assert (parts.readout - ref["readout"]).abs().max() <= 1e-5
    assert parts.heads.abs().max() > 1e-2 and parts.readout.abs().max() > 1e-2


def test_textspan_terms_equal_the_naive_reference_and_sum_to_the_normalised_embedding(family, images):
    terms, through, ref = naive(family, images)
    parts = decompose(family, images, convention="textspan")
    with torch.inference_mode():
        embedding = family.encode_image(images, normalize=True)
    assert (parts.total() - embedding).abs().max() <= 1e-5
    assert parts.ln_bias.abs().max() == 0
    n_heads, shares = family.n_heads, 2 * family.n_layers + 1
    norm, mean, std = ref["norm"], ref["mean"], ref["std"]
    scale = ref["embedding"].norm(dim=-1, keepdim=True)
    biases = ref["constant"] - through(norm.bias.expand_as(mean.expand(-1, -1, norm.weight.shape[0])))

    def shared(c, share):  # one of `share` equal parts of the token's mean and of every bias
        post = norm.weight * (c - mean / share) / std + norm.bias / share
        return (through(post) + biases / share) / scale

    for layer in range(family.n_layers):
        for head in range(n_heads):
            expected = shared(terms[(layer, head)] + terms[("bias", layer)] / n_heads, shares * n_heads)
            assert (parts.heads[:, layer, head] - expected).abs().max() <= 1e-5
        assert (parts.mlp[:, layer] - shared(terms[("mlp", layer)], shares)).abs().max() <= 1e-5
    assert (parts.embedding - shared(terms["embedding"], shares)).abs().max() <= 1e-5
    assert (parts.readout - ref["readout"] / scale).abs().max() <= 1e-5


def test_a_zero_ablated_head_and_a_silent_pooling_mlp_contribute_nothing(siglip, images):
    baked = as_backend(clipheads.bake(siglip, clipheads.HeadMask.from_heads("L1.H2", siglip), op="zero"))
    parts = decompose(baked, images, convention="centred")
    assert parts.heads[:, 1, 2].abs().max() == 0 and parts.heads[:, 1, 1].abs().max() > 0
    silent = as_backend(copy.deepcopy(siglip.model))
    fc2 = silent.model.vision_model.head.mlp.fc2
    torch.nn.init.zeros_(fc2.weight)
    torch.nn.init.zeros_(fc2.bias)
    parts = decompose(silent, images, convention="centred")
    assert parts.readout.abs().max() == 0
    with torch.inference_mode():
        assert (parts.total() - silent.encode_image(images)).abs().max() <= 1e-5


def test_batches_join_with_the_readout(siglip, images):
    joined = decompose_batches(siglip, [images[:2], images[2:]], layers="1", convention="centred")
    assert joined.layers == [1] and joined.heads.shape[:3] == (5, 1, 4) and joined.readout.shape == (5, 64)
    with torch.inference_mode():
        assert (joined.total() - siglip.encode_image(images)).abs().max() <= 1e-5


@pytest.mark.parametrize("convention", ["centred", "textspan"])
def test_spatial_terms_sum_to_the_head_terms(siglip, images, convention):
    parts = decompose(siglip, images, convention=convention)
    maps = spatial_decomposition(siglip, images, "L0.H1,L1.H3", convention=convention)
    assert maps.terms.shape == (5, 2, 16, 64) and maps.prefix_tokens == 0  # 4x4 patches, no class token
    assert (maps.terms.sum(2)[:, 0] - parts.heads[:, 0, 1]).abs().max() <= 1e-5
    assert (maps.terms.sum(2)[:, 1] - parts.heads[:, 1, 3]).abs().max() <= 1e-5
    assert maps.grid(maps.project(torch.ones(64))).shape == (5, 2, 4, 4)


def test_attention_maps_have_no_class_token_row(siglip, images):
    maps = attention_maps(siglip, images, [1])
    rows = maps.cls_row(1, 2)  # the attention each patch receives, averaged over the queries
    assert rows.shape == (5, 4, 4)
    assert torch.allclose(rows, maps.weights[:, 0, 2].mean(dim=1).view(5, 4, 4))
    assert torch.allclose(rows.sum(dim=(1, 2)), torch.ones(5))


def test_the_atlas_builds_with_maps(siglip):
    import numpy as np
    from PIL import Image

    from clipheads.explain.atlas import AtlasInputs, build_atlas

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    atlas = build_atlas(siglip, images, ["a", "b", "c"], AtlasInputs(), maps=2)
    assert atlas["n_layers"] == 2 and atlas["n_heads"] == 4
