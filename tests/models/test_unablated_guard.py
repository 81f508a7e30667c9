"""Tools that install their own gates (search, attribution, decomposition) refuse a model that is already ablated,
whether through ``clipheads.apply`` or a bare head hook, and accept it again once removed."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.explain import decompose


def test_ablated_or_hooked_model_is_refused_until_removed(tiny_backend, pixels):
    backend = tiny_backend
    mask = clipheads.HeadMask.from_heads("L0.H0", backend)
    with clipheads.ablate(backend, mask), pytest.raises(clipheads.ClipHeadsError, match="decomposition.*remove"):
        decompose(backend, pixels)
    backend.set_head_hook(1, lambda heads, values: heads)
    try:
        with pytest.raises(clipheads.ClipHeadsError, match="unablated model"):
            backend.require_unablated("the test")
    finally:
        backend.clear_head_hooks()
    backend.require_unablated("the test")
    torch.testing.assert_close(decompose(backend, pixels, convention="centred").total(), backend.encode_image(pixels),
                               atol=1e-4, rtol=1e-4)
