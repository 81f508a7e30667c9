"""The hooked nn.MultiheadAttention of an open_clip block behaves as the module it replaces, or refuses in one line."""

from __future__ import annotations

import pytest
import torch

from clipheads.errors import ClipHeadsError
from clipheads.models.random_init import tiny_open_clip

B, T = 2, 5


@pytest.fixture()
def attn():
    backend = tiny_open_clip(seed=4)
    module = backend.attention_module(0)
    yield backend, module
    backend.clear_head_hooks()


def _masks(heads: int):
    torch.manual_seed(0)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, -2:] = True
    return {
        "none": {},
        "bool": {"attn_mask": causal},
        "float": {"attn_mask": torch.randn(T, T)},
        "per_head": {"attn_mask": torch.randn(B * heads, T, T)},
        "padding": {"key_padding_mask": padding},
        "padding_float": {"key_padding_mask": torch.where(padding, float("-inf"), 0.0)},
        "bool_and_padding": {"attn_mask": causal, "key_padding_mask": padding},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal_and_padding": {"attn_mask": causal, "key_padding_mask": padding, "is_causal": True},
    }


@pytest.mark.parametrize("case", list(_masks(4)))
@pytest.mark.parametrize("grad", [False, True])
def test_hooked_forward_equals_the_module(attn, case, grad):
    backend, module = attn
    kwargs = _masks(module.num_heads)[case]
    x = torch.randn(B, T, module.embed_dim)
    context = torch.enable_grad() if grad else torch.inference_mode()  # inference: torch's fused fast path
    with context:
        expected, _ = module(x, x, x, need_weights=False, **kwargs)
        backend.set_head_hook(0, lambda z, v: z)
        got, weights = module(x, x, x, need_weights=False, **kwargs)
        backend.clear_head_hooks()
    assert weights is None
    finite = torch.isfinite(expected)  # fused and unfused kernels may differ on fully padded rows only
    assert torch.equal(finite, torch.isfinite(got))
    assert (got[finite] - expected[finite]).abs().max() <= 1e-5


def test_hooked_forward_unbatched_and_sequence_first(attn):
    backend, module = attn
    x = torch.randn(T, module.embed_dim)
    with torch.no_grad():
        expected, _ = module(x, x, x, need_weights=False)
        module.batch_first = False
        seq_first = torch.randn(T, B, module.embed_dim)
        expected_sf, _ = module(seq_first, seq_first, seq_first, need_weights=False)
        backend.set_head_hook(0, lambda z, v: z)
        got_sf, _ = module(seq_first, seq_first, seq_first, need_weights=False)
        module.batch_first = True
        got, _ = module(x, x, x, need_weights=False)
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5
    assert (got_sf - expected_sf).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(_masks(4)))
def test_hooked_forward_returns_the_modules_weights(attn, case):
    """need_weights=True (per head and averaged): the module's own weights, bit for bit, under a pass-through hook."""
    backend, module = attn
    kwargs = _masks(module.num_heads)[case]
    x = torch.randn(B, T, module.embed_dim)
    with torch.inference_mode():
        expected, per_head = module(x, x, x, average_attn_weights=False, **kwargs)
        averaged = module(x, x, x, **kwargs)[1]
        backend.set_head_hook(0, lambda z, v: z)
        got, got_per_head = module(x, x, x, average_attn_weights=False, **kwargs)
        got_averaged = module(x, x, x, **kwargs)[1]
        one = x[0]
        unbatched = module(one, one, one, average_attn_weights=False,
                           **{k: v[0] if k == "key_padding_mask" else v for k, v in kwargs.items()
                              if k != "attn_mask" or v.dim() == 2})[1]
        backend.clear_head_hooks()
    assert per_head.shape == (B, module.num_heads, T, T) and averaged.shape == (B, T, T)
    assert torch.equal(got_per_head, per_head) and torch.equal(got_averaged, averaged)
    assert unbatched.shape == (module.num_heads, T, T)
    finite = torch.isfinite(expected)
    assert (got[finite] - expected[finite]).abs().max() <= 1e-5


def test_weights_under_attention_dropout_in_training_are_refused(attn):
    backend, module = attn
    module.dropout, module.training = 0.1, True
    try:
        backend.set_head_hook(0, lambda z, v: z)
        x = torch.randn(B, T, module.embed_dim)
        with pytest.raises(ClipHeadsError, match="dropout") as info:
            module(x, x, x)
        assert "\n" not in str(info.value)
        assert module(x, x, x, need_weights=False)[1] is None  # without weights it runs
    finally:
        module.dropout, module.training = 0.0, False


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, x: m(x, x.clone(), x.clone(), need_weights=False), "self-attention only"),
    (lambda m, x: m(x, x, x, need_weights=False, is_causal=True), "needs attn_mask"),
])
def test_unsupported_arguments_are_refused_in_one_line(attn, call, message):
    backend, module = attn
    backend.set_head_hook(0, lambda z, v: z)
    with pytest.raises(ClipHeadsError, match=message) as info:
        call(module, torch.randn(B, T, module.embed_dim))
    assert "\n" not in str(info.value)
