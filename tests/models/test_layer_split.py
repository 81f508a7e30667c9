"""The search's fast path: a layer split into attention and the rest equals the library's layer, hooks included,
and the last layer run for the class token alone gives the class token's row of the full layer."""

from __future__ import annotations

import torch

import clipheads


def test_split_layer_equals_the_library_layer(tiny_backend, pixels):
    backend = tiny_backend
    assert backend.supports_layer_split and backend.readout_tokens == 1
    with torch.no_grad():
        x = backend.embed(pixels)
        for layer in range(backend.n_layers):
            full = backend.run_layers(x, layer, layer + 1)
            torch.testing.assert_close(backend.run_layer_split(layer, x), full, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(backend.run_layer_split(layer, x, queries=1), full[:, :1], atol=1e-5,
                                       rtol=1e-5)
            x = full


def test_split_layer_runs_the_head_hook(tiny_backend, pixels):
    backend = tiny_backend
    mask = clipheads.HeadMask.from_heads(["L0.H1", "L1.H0"], backend)
    with torch.no_grad():
        x = backend.embed(pixels)
        for op in ("identity", "cls", "zero"):
            with clipheads.ablate(backend, mask, op=op):
                reference = backend.encode_image(pixels)
                hidden = backend.run_layer_split(0, x)
                hidden = backend.run_layers(hidden, 1, backend.n_layers - 1)
                fast = backend.pool(backend.run_layer_split(backend.n_layers - 1, hidden, queries=1))
            torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
            with clipheads.ablate(backend, clipheads.HeadMask.ones(backend)):
                assert not torch.allclose(fast, backend.encode_image(pixels), atol=1e-4), op
    assert backend.hooked_layers == []
