"""The attention-pooling read-out as linear pieces: with the probe's pattern and the norm's per-token statistics
frozen, the pieces rebuild the library module's output (transformers' SigLIP head, timm's AttentionPoolLatent)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipheads.errors import ClipHeadsError
from clipheads.models.pooling import AttentionPool
from clipheads.models.random_init import tiny_model


def rebuilt(pool: AttentionPool, x: torch.Tensor) -> torch.Tensor:
    mean, std = pool.statistics(x)
    pattern = pool.pattern(x)
    assert torch.allclose(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
    pooled = pool.through(pool.gamma(x[0, 0]) * (x - mean) / std, pattern) + pool.constant()
    per_token = pool.through(pool.gamma(x[0, 0]) * (x - mean) / std, pattern, per_token=True)
    assert (per_token.sum(1) + pool.constant() - pooled).abs().max() <= 1e-5
    return pool.finish(pooled)


def test_siglip_head_is_rebuilt():
    siglip = tiny_model("siglip", seed=1)
    vision = siglip.model.vision_model
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vision.head(vision.post_layernorm(x))
        assert (rebuilt(siglip.attention_pool(), x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("qk_norm", [False, True])
def test_timm_attention_pool_latent_is_rebuilt(qk_norm):
    from timm.layers import AttentionPoolLatent

    torch.manual_seed(0)
    module = AttentionPoolLatent(64, num_heads=4, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    norm = nn.LayerNorm(64)
    with torch.no_grad():
        for param in (*norm.parameters(), module.latent, module.kv.bias, module.proj.bias):
            param.normal_()
        x = torch.randn(3, 10, 64)
        pool = AttentionPool.from_timm(norm, module)
        assert (rebuilt(pool, x) - module(norm(x))).abs().max() <= 1e-5
    with pytest.raises(ClipHeadsError, match="several latents"):
        AttentionPool.from_timm(norm, AttentionPoolLatent(64, num_heads=4, latent_len=2))
