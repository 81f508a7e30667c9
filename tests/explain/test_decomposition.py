"""The ``centred`` head decomposition sums back to the model's image embedding, on both backends (the published
``textspan`` convention: test_decomposition_published.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import clipheads
from clipheads.errors import ClipHeadsError
from clipheads.explain.decomposition import decompose, decompose_batches
from clipheads.models import as_backend
from clipheads.models.random_init import random_hf_clip, tiny_open_clip


@pytest.fixture(scope="module", params=["hf", "chinese", "open_clip"])
def model(request):
    if request.param == "chinese":  # ChineseCLIPModel: the same vision code under other class names
        from clipheads.models.random_init import tiny_model

        return tiny_model("chinese")
    return random_hf_clip("tiny") if request.param == "hf" else tiny_open_clip()


@pytest.fixture()
def images():
    torch.manual_seed(3)
    return torch.randn(6, 3, 32, 32)


def test_terms_sum_to_the_embedding(model, images):
    parts = decompose(model, images, convention="centred")
    n, d = images.shape[0], model.encode_image(images[:1]).shape[-1]
    assert parts.heads.shape == (n, model.n_layers, model.n_heads, d)
    assert parts.mlp.shape == parts.attention.shape == (n, model.n_layers, d)
    assert torch.allclose(parts.total(), model.encode_image(images), atol=1e-4)


def test_heads_plus_bias_are_the_attention_term(model, images):
    parts = decompose(model, images, layers=[1], convention="centred")
    assert parts.layers == [1] and parts.heads.shape[1] == 1
    bias = parts.attention_bias()
    # the out_proj bias term is the same vector for every head set; it is not a head
    assert torch.allclose(parts.heads.sum(2) + bias, parts.attention[:, [1]], atol=1e-6)
    assert torch.allclose(parts.total(), model.encode_image(images), atol=1e-4)


def test_head_terms_carry_the_whole_attention_output(model, images):
    """With every MLP switched off, the MLP terms vanish: nothing of the attention output leaks into them."""
    silent = as_backend(copy.deepcopy(model.model))
    for layer in range(silent.n_layers):
        fc = silent.model.vision_model.encoder.layers[layer].mlp.fc2 if hasattr(silent.model, "vision_model") \
            else silent.model.visual.transformer.resblocks[layer].mlp.c_proj
        torch.nn.init.zeros_(fc.weight)
        torch.nn.init.zeros_(fc.bias)
    parts = decompose(silent, images, convention="centred")
    assert parts.mlp.abs().max() < 1e-5
    assert parts.heads.abs().max() > 1e-3
    assert torch.allclose(parts.total(), silent.encode_image(images), atol=1e-4)


def test_a_zero_ablated_head_contributes_nothing(model, images):
    """Head terms are the heads: zeroing one head's output zeroes its own term and no other."""
    last = model.n_layers - 1
    baked = as_backend(clipheads.bake(model, clipheads.HeadMask.from_heads(f"L{last}.H2", model), op="zero"))
    parts = decompose(baked, images, convention="centred")
    assert parts.heads[:, last, 2].abs().max() == 0
    assert parts.heads[:, last, 1].abs().max() > 0


def test_batches_join_and_ablated_models_are_refused(model, images):
    joined = decompose_batches(model, [images[:4], images[4:]], layers="0", convention="centred")
    assert joined.n_images == 6 and joined.layers == [0]
    assert torch.allclose(joined.total(), model.encode_image(images), atol=1e-4)
    with clipheads.ablate(model, clipheads.HeadMask.from_heads("L0.H0", model), op="zero"), \
            pytest.raises(ClipHeadsError, match="unablated"):
        decompose(model, images)
    with pytest.raises(ClipHeadsError, match="go past the last layer"):
        decompose(model, images, layers=[7])
