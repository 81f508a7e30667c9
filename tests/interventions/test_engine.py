"""ablate/apply/remove/bake: exactness, restoration, gradients, baking and save/load round-trips."""

from __future__ import annotations

import json

import pytest
import torch

import clipheads
from clipheads.models.random_init import random_hf_clip, random_open_clip


def test_all_ones_mask_is_exactly_the_library(tiny_backend, pixels):
    with torch.inference_mode():
        reference = tiny_backend.encode_image(pixels)
        with clipheads.ablate(tiny_backend, clipheads.HeadMask.ones(tiny_backend)):
            assert tiny_backend.hooked_layers == []
            out = tiny_backend.encode_image(pixels)
    assert torch.equal(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hf", "open_clip"])
def test_all_ones_mask_on_vit_b32_size(family):
    backend = random_hf_clip("ViT-B/32") if family == "hf" else random_open_clip("ViT-B-32")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        reference = backend.encode_image(pixels)
        with clipheads.ablate(backend, clipheads.HeadMask.ones(backend)):
            out = backend.encode_image(pixels)
        # a hooked layer with every gate at 1 runs clipheads' own attention path: equal within fp32 noise
        hooked = torch.ones(backend.n_layers, backend.n_heads).requires_grad_()
    with torch.no_grad(), clipheads.ablate(backend, clipheads.HeadMask.from_tensor(hooked)):
        through_hooks = backend.encode_image(pixels)
    assert (out - reference).abs().max() <= 1e-5
    assert (through_hooks - reference).abs().max() <= 1e-5
    assert backend.n_layers == 12 and backend.n_heads == 12 and backend.head_dim == 64


def test_staged_forward_equals_library(tiny_backend, pixels):
    with torch.inference_mode():
        assert (tiny_backend.encode_image_staged(pixels) - tiny_backend.encode_image(pixels)).abs().max() <= 1e-6
        assert (tiny_backend.encode_image_readout(pixels) - tiny_backend.encode_image(pixels)).abs().max() <= 1e-6
        mask = clipheads.HeadMask.from_heads("L0.H1,L1.H3", tiny_backend)
        with clipheads.ablate(tiny_backend, mask, op="zero"):  # the last layer's hook runs on the read-out rows too
            ablated = tiny_backend.encode_image(pixels)
            assert (tiny_backend.encode_image_readout(pixels) - ablated).abs().max() <= 1e-6


def test_context_manager_restores_on_exception(tiny_backend, pixels):
    mask = clipheads.HeadMask.from_heads("L0.H1,L1.H3", tiny_backend)
    with torch.inference_mode():
        reference = tiny_backend.encode_image(pixels)
        with pytest.raises(RuntimeError, match="boom"), clipheads.ablate(tiny_backend, mask):
            assert tiny_backend.hooked_layers == [0, 1]
            raise RuntimeError("boom")
        assert tiny_backend.hooked_layers == [] and tiny_backend.intervention is None
        assert torch.equal(tiny_backend.encode_image(pixels), reference)


def test_only_layers_with_ablated_heads_are_hooked(tiny_backend):
    mask = clipheads.HeadMask.from_heads(["L1.H2"], tiny_backend)
    with clipheads.ablate(tiny_backend, mask):
        assert tiny_backend.hooked_layers == [1]


def test_apply_and_remove_through_the_library_model(tiny_backend, pixels):
    mask = clipheads.HeadMask.from_heads("L0.H0", tiny_backend)
    with torch.inference_mode():
        reference = tiny_backend.encode_image(pixels)
        clipheads.apply(tiny_backend.model, mask, op="zero")  # the raw library model works too
        try:
            assert tiny_backend.hooked_layers == [0]
            with pytest.raises(clipheads.ClipHeadsError, match="already"):
                clipheads.apply(tiny_backend, mask)
            assert not torch.equal(tiny_backend.encode_image(pixels), reference)
        finally:
            clipheads.remove(tiny_backend.model)
        assert torch.equal(tiny_backend.encode_image(pixels), reference)


@pytest.mark.parametrize("op", ["identity", "cls", "zero", "mean", "scale"])
def test_gradients_reach_soft_gates(tiny_backend, pixels, op):
    gates = torch.full((tiny_backend.n_layers, tiny_backend.n_heads), 0.7, requires_grad=True)
    means = torch.randn(tiny_backend.n_layers, tiny_backend.n_heads, tiny_backend.head_dim)
    for p in tiny_backend.model.parameters():
        p.requires_grad_(False)
    try:
        with clipheads.ablate(tiny_backend, clipheads.HeadMask.from_tensor(gates), op=op, alpha=0.5, means=means):
            tiny_backend.encode_image(pixels).pow(2).sum().backward()
    finally:
        for p in tiny_backend.model.parameters():
            p.requires_grad_(True)
    assert gates.grad is not None and torch.isfinite(gates.grad).all()
    assert (gates.grad != 0).all(), "every head's gate must receive a gradient"


@pytest.mark.parametrize("op", ["zero", "mean", "scale"])
def test_bake_equals_context_manager(tiny_backend, pixels, op):
    gates = torch.ones(tiny_backend.n_layers, tiny_backend.n_heads)
    gates[0, 1], gates[1, 3], gates[1, 0] = 0.0, 0.0, 0.4
    mask = clipheads.HeadMask.from_tensor(gates, tiny_backend)
    means = clipheads.compute_head_means(tiny_backend, pixels, kind="pooled") if op == "mean" else None
    with torch.inference_mode():
        with clipheads.ablate(tiny_backend, mask, op=op, alpha=0.25, means=means):
            expected = tiny_backend.encode_image(pixels)
        baked = clipheads.bake(tiny_backend, mask, op=op, alpha=0.25, means=means)
        assert type(baked) is type(tiny_backend.model)
        got = clipheads.as_backend(baked).encode_image(pixels)
        untouched = tiny_backend.encode_image(pixels)
    assert (got - expected).abs().max() <= 1e-5
    assert (untouched - expected).abs().max() > 1e-4, "bake must not modify the original model"


def test_bake_refuses_identity_and_per_position_means(tiny_backend, pixels):
    mask = clipheads.HeadMask.from_heads("L0.H0", tiny_backend)
    with pytest.raises(clipheads.OperatorError, match="cannot be folded"):
        clipheads.bake(tiny_backend, mask, op="identity")
    means = clipheads.compute_head_means(tiny_backend, pixels)  # default: per-position
    with pytest.raises(clipheads.OperatorError, match="per-position head means cannot be folded into out_proj"):
        clipheads.bake(tiny_backend, mask, op="mean", means=means)


def test_baked_hf_model_round_trips_through_save_pretrained(tiny_hf, pixels, tmp_path):
    from transformers import CLIPModel

    mask = clipheads.HeadMask.from_heads("L0.H2,L1.H1", tiny_hf)
    baked = clipheads.bake(tiny_hf, mask, op="scale", alpha=0.5)
    baked.save_pretrained(tmp_path)
    reloaded = CLIPModel.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        a = clipheads.as_backend(baked).encode_image(pixels)
        b = clipheads.as_backend(reloaded).encode_image(pixels)
    assert torch.equal(a, b)


def test_baked_open_clip_model_round_trips_through_a_checkpoint(pixels, tmp_path):
    from clipheads.models.random_init import tiny_open_clip

    backend = tiny_open_clip(seed=3)
    mask = clipheads.HeadMask.from_heads("L1.H0", backend)
    baked = clipheads.bake(backend, mask, op="zero")
    torch.save(baked.state_dict(), tmp_path / "baked.pt")
    reloaded = clipheads.load(f"open_clip:ClipHeads-Tiny-ViT/{tmp_path / 'baked.pt'}")
    with torch.inference_mode():
        with clipheads.ablate(backend, mask, op="zero"):
            expected = backend.encode_image(pixels)
        got = reloaded.encode_image(pixels)
    assert (got - expected).abs().max() <= 1e-5


def test_head_means_shape_and_values(tiny_backend, pixels):
    pooled = clipheads.compute_head_means(tiny_backend, [pixels[:2], pixels[2:]], kind="pooled")
    assert pooled.shape == (tiny_backend.n_layers, tiny_backend.n_heads, tiny_backend.head_dim)
    means = clipheads.compute_head_means(tiny_backend, [pixels[:2], pixels[2:]])
    tokens = tiny_backend.embed(pixels).shape[1]
    assert means.shape == (tiny_backend.n_layers, tiny_backend.n_heads, tokens, tiny_backend.head_dim)
    recorded = {}

    def grab(z, v):
        recorded["z"] = z.detach().clone()
        return z

    tiny_backend.set_head_hook(1, grab)
    try:
        with torch.inference_mode():
            tiny_backend.encode_image(pixels)
    finally:
        tiny_backend.clear_head_hooks()
    assert (pooled[1] - recorded["z"].mean(dim=(0, 1))).abs().max() <= 1e-5  # z: [B, T, H, d]
    assert (means[1] - recorded["z"].mean(dim=0).transpose(0, 1)).abs().max() <= 1e-5  # each position's own mean
    assert (means[1, :, 0] - pooled[1]).abs().max() > 1e-3  # the class token's mean is not the pooled one
    with pytest.raises(clipheads.ClipHeadsError, match="unknown kind of head means 'tokens'"):
        clipheads.compute_head_means(tiny_backend, pixels, kind="tokens")


def test_mean_operator_uses_means_stored_in_the_mask(tiny_backend, pixels, tmp_path):
    means = clipheads.compute_head_means(tiny_backend, pixels)
    mask = clipheads.HeadMask.from_heads("L1.H2", tiny_backend)
    mask.means = means
    mask.save(tmp_path / "m.json")
    loaded = clipheads.HeadMask.load(tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["means_kind"] == "per-position"
    assert loaded.means.shape == means.shape and torch.equal(loaded.means[1, 2], means[1, 2])
    with torch.inference_mode():
        with clipheads.ablate(tiny_backend, mask, op="mean"):
            a = tiny_backend.encode_image(pixels)
        with clipheads.ablate(tiny_backend, loaded, op="mean"):
            b = tiny_backend.encode_image(pixels)
    assert (a - b).abs().max() <= 1e-6


def test_an_ablation_whose_hooks_never_run_is_an_error(pixels):
    from clipheads.models.random_init import tiny_model

    backend = tiny_model("hf", seed=2)
    mask = clipheads.HeadMask.from_heads("L0.H0", backend)
    with clipheads.ablate(backend, mask):
        backend.model.vision_model.config._attn_implementation = "sdpa"  # something bypasses the hook
        with pytest.raises(clipheads.ClipHeadsError, match="hooks did not run"):
            backend.encode_image(pixels)
        backend.model.vision_model.config._attn_implementation = "clipheads"
