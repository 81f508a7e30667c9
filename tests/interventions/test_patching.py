"""Activation patching against a naive reference that builds every head's attention explicitly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import clipheads
from clipheads.interventions import patch_effects, record_head_outputs

_spec = importlib.util.spec_from_file_location("interventions_layer_parts", Path(__file__).with_name("layer_parts.py"))
_layer_parts_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_layer_parts_module)
_layer_parts = _layer_parts_module.layer_parts


def naive_patched(backend, source, destination, heads):
    """Run source and destination side by side with explicit softmax attention; the destination's chosen heads
    take the source's per-head outputs."""
    n_heads, d = backend.n_heads, backend.head_dim
    xs, xd = backend.embed(source), backend.embed(destination)
    for layer in range(backend.n_layers):
        ln1, qkv, out_proj, ln2, mlp, ls1, ls2 = _layer_parts(backend, layer)
        zs_zd = []
        for x in (xs, xd):
            b, t, w = x.shape
            q, k, v = (p.view(b, t, n_heads, d).transpose(1, 2) for p in qkv(ln1(x)))
            zs_zd.append(torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v)  # [B, H, T, d]
        zs, zd = zs_zd
        for lay, h in heads:
            if lay == layer:
                zd[:, h] = zs[:, h]
        new = []
        for x, z in ((xs, zs), (xd, zd)):
            b, t, w = x.shape
            x = x + ls1(out_proj(z.transpose(1, 2).reshape(b, t, w)))
            new.append(x + ls2(mlp(ln2(x))))
        xs, xd = new
    return backend.pool(xd)


@pytest.mark.parametrize("heads", [[(0, 1)], [(0, 0), (1, 1)], [(1, 0), (1, 1)]],
                         ids=["one", "two-layers", "one-layer"])
def test_patch_matches_naive_reference(tiny_backend, heads):
    torch.manual_seed(3)
    source, destination = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    labels = [clipheads.head_label(*h) for h in heads]
    with torch.no_grad():
        expected = naive_patched(tiny_backend, source, destination, heads)
        with clipheads.patch(tiny_backend, labels, source) as patched:
            assert patched.intervention is not None
            got = tiny_backend.encode_image(destination)
        plain = tiny_backend.encode_image(destination)
    assert tiny_backend.intervention is None and not tiny_backend.hooked_layers
    assert (got - expected).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-3, "patching must change the destination's embedding"


def test_patching_images_into_themselves_changes_nothing(tiny_backend):
    torch.manual_seed(4)
    images = torch.randn(2, 3, 32, 32)
    everything = [(layer, h) for layer in range(tiny_backend.n_layers) for h in range(tiny_backend.n_heads)]
    with torch.no_grad(), clipheads.patch(tiny_backend, everything, images):
        same = tiny_backend.encode_image(images)
    assert torch.allclose(same, tiny_backend.encode_image(images), atol=1e-6)


def test_patch_effects_fractions(tiny_backend):
    torch.manual_seed(5)
    source, destination = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    result = patch_effects(tiny_backend, "L0.H0,L1.H1", source, destination)
    assert result.heads == ["L0.H0", "L1.H1"]
    assert result.explained.shape == (3, 2) and result.joint.shape == (3,)
    with torch.no_grad():
        e_s, e_d = tiny_backend.encode_image(source), tiny_backend.encode_image(destination)
        with clipheads.patch(tiny_backend, "L1.H1", source):
            e_h = tiny_backend.encode_image(destination)
    delta = e_s - e_d
    expected = ((e_h - e_d) * delta).sum(-1) / (delta * delta).sum(-1)
    assert torch.allclose(result.explained[:, 1], expected, atol=1e-5)
    assert torch.allclose(result.change, delta.norm(dim=-1), atol=1e-5)
    data = result.to_dict()
    assert set(data["mean_explained"]) == {"L0.H0", "L1.H1"} and len(data["pairs"]) == 3


def test_patch_refuses_bad_input(tiny_backend):
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(clipheads.ClipHeadsError, match="not a head"), clipheads.patch(tiny_backend, "L99.H0", images):
        pass
    with pytest.raises(clipheads.ClipHeadsError, match="pair them"):
        patch_effects(tiny_backend, "L0.H0", images, images[:1])
    with pytest.raises(clipheads.ClipHeadsError, match="source images"), torch.no_grad(), \
            clipheads.patch(tiny_backend, "L0.H0", images):
        tiny_backend.encode_image(images[:1])
    assert not tiny_backend.hooked_layers


def test_record_stops_at_the_last_requested_layer(tiny_backend):
    recorded = record_head_outputs(tiny_backend, torch.randn(1, 3, 32, 32), [0])
    assert list(recorded) == [0]
    assert recorded[0].shape[2:] == (tiny_backend.n_heads, tiny_backend.head_dim)


def test_evaluation_refuses_to_run_inside_a_patch(tiny_hf, tmp_path):
    from PIL import Image

    from clipheads.eval.features import encode_images

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with clipheads.patch(tiny_hf, "L0.H0", torch.randn(1, 3, 32, 32)), \
            pytest.raises(clipheads.ClipHeadsError, match="inside clipheads.patch"):
        encode_images(tiny_hf, [tmp_path / "a.png"])
    assert not tiny_hf.hooked_layers
