"""Attention weights under ablation: the model's own implementation keeps returning them (transformers
``output_attentions=True`` with eager attention, open_clip's ``need_weights=True``), unablated heads bit for bit as the
library computes them, ablated heads showing what the operator did."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.interventions import OPERATORS
from clipheads.models.random_init import tiny_model

ALPHA = 0.3
LAYER, HEAD = 1, 2  # the ablated head: in the last layer, so every other map sees the unablated residual stream


def _expected_ablated(op: str, weights: torch.Tensor) -> torch.Tensor:
    """What the ablated head's map [B, T, T] must be (the operator's attention matrix)."""
    if op == "identity":
        return torch.eye(weights.shape[-1]).expand_as(weights)
    if op == "cls":
        expected = torch.zeros_like(weights)
        expected[..., 0] = 1.0
        return expected
    if op == "scale":
        return ALPHA * weights
    return torch.zeros_like(weights)  # zero, mean: the head reads no token of the image


def _ablation(backend, op):
    mask = clipheads.HeadMask.from_heads([f"L{LAYER}.H{HEAD}"], backend)
    means = torch.randn(backend.n_layers, backend.n_heads, backend.head_dim) if op == "mean" else None
    return clipheads.ablate(backend, mask, op=op, alpha=ALPHA, means=means)


@pytest.fixture(scope="module", params=["hf", "chinese", "siglip"])
def eager_backend(request):
    backend = tiny_model(request.param, seed=3)
    backend.model.set_attn_implementation("eager")
    return backend


@pytest.mark.parametrize("op", OPERATORS)
def test_transformers_eager_returns_weights_under_ablation(eager_backend, pixels, op):
    if op == "cls" and eager_backend.prefix_tokens == 0:
        pytest.skip("no class token (SigLIP): the cls operator is refused (tests/search/test_engine_siglip.py)")
    vision = eager_backend.model.vision_model
    with torch.no_grad():
        vanilla = vision(pixel_values=pixels, output_attentions=True)
        with _ablation(eager_backend, op):
            assert vision.config._attn_implementation == "clipheads"
            ablated = vision(pixel_values=pixels, output_attentions=True)
        assert vision.config._attn_implementation == "eager"  # restored
    assert len(vanilla.attentions) == len(ablated.attentions) == eager_backend.n_layers
    assert torch.equal(ablated.attentions[0], vanilla.attentions[0])  # an unablated layer: the library's own bits
    others = [h for h in range(eager_backend.n_heads) if h != HEAD]
    assert torch.equal(ablated.attentions[LAYER][:, others], vanilla.attentions[LAYER][:, others])
    got = ablated.attentions[LAYER][:, HEAD]
    assert torch.equal(got, _expected_ablated(op, vanilla.attentions[LAYER][:, HEAD]))
    # the ablation itself ran (the output moved)
    assert (ablated.last_hidden_state - vanilla.last_hidden_state).abs().max() > 1e-4


def test_maps_are_the_models_own_eager_weights(eager_backend, pixels):
    """clipheads' attention maps (explain) equal transformers' output_attentions bit for bit, also under ablation."""
    from clipheads.explain.spatial import attention_maps

    vision = eager_backend.model.vision_model
    mask = clipheads.HeadMask.from_heads(["L0.H1", "L1.H2"], eager_backend)
    with torch.no_grad():
        own = vision(pixel_values=pixels, output_attentions=True).attentions
        with clipheads.ablate(eager_backend, mask, op="identity"):
            own_ablated = vision(pixel_values=pixels, output_attentions=True).attentions
    maps = attention_maps(eager_backend, pixels, [0, 1])
    maps_ablated = attention_maps(eager_backend, pixels, [0, 1], mask=mask, op="identity")
    for layer in (0, 1):
        assert torch.equal(maps.weights[:, layer], own[layer])
        assert torch.equal(maps_ablated.weights[:, layer], own_ablated[layer])
    assert torch.equal(maps_ablated.weights[:, 0, 1], torch.eye(own[0].shape[-1]).expand_as(own[0][:, 1]))


def test_sdpa_model_asked_for_weights_under_ablation_says_so_in_one_line(pixels):
    backend = tiny_model("hf", seed=3)  # transformers' default: sdpa, which returns no weights
    assert backend.model.vision_model.config._attn_implementation == "sdpa"
    refused = pytest.raises(clipheads.ClipHeadsError, match=r"set_attn_implementation\('eager'\)")
    with _ablation(backend, "identity"), refused as info, torch.no_grad():
        backend.model.vision_model(pixel_values=pixels, output_attentions=True)
    assert "\n" not in str(info.value) and "sdpa" in str(info.value)
    with _ablation(backend, "identity"), torch.no_grad():  # not asked for weights: runs as before
        assert backend.encode_image(pixels).shape[0] == pixels.shape[0]


@pytest.fixture(scope="module")
def open_clip_backend():
    return tiny_model("open_clip", seed=3)


def _block_input(backend, pixels, layer):
    """The residual stream entering ``layer`` ``[B, T, W]``, through the library's own blocks."""
    with torch.no_grad():
        return backend.run_layers(backend.embed(pixels), 0, layer)


@pytest.mark.parametrize("op", OPERATORS)
@pytest.mark.parametrize("average", [False, True])
def test_open_clip_need_weights_under_ablation(open_clip_backend, pixels, op, average):
    """The hooked nn.MultiheadAttention returns the weights as the module does; the ablated head shows its operator."""
    x = _block_input(open_clip_backend, pixels, LAYER)
    block = open_clip_backend.model.visual.transformer.resblocks[LAYER]
    h = block.ln_1(x).detach()
    with torch.no_grad():
        out, own = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
        own_avg = block.attn(h, h, h, need_weights=True)[1]
        with _ablation(open_clip_backend, op):
            got_out, got = block.attn(h, h, h, need_weights=True, average_attn_weights=average)
    expected = own.clone()
    expected[:, HEAD] = _expected_ablated(op, own[:, HEAD])
    if average:
        assert got.shape == own_avg.shape
        assert (got - expected.mean(dim=1)).abs().max() <= 1e-6
    else:
        others = [i for i in range(open_clip_backend.n_heads) if i != HEAD]
        assert torch.equal(got[:, others], own[:, others])  # the module's own weights, bit for bit
        assert torch.equal(got[:, HEAD], expected[:, HEAD])
    assert (got_out - out).abs().max() > 1e-4  # the ablation ran


def test_open_clip_maps_are_the_modules_weights(open_clip_backend, pixels):
    """clipheads' attention maps are nn.MultiheadAttention's own need_weights=True weights on the block's input."""
    from clipheads.explain.spatial import attention_maps

    maps = attention_maps(open_clip_backend, pixels, [0, 1])
    for layer in (0, 1):
        x = _block_input(open_clip_backend, pixels, layer)
        block = open_clip_backend.model.visual.transformer.resblocks[layer]
        with torch.no_grad():
            h = block.ln_1(x)
            own = block.attn(h, h, h, need_weights=True, average_attn_weights=False)[1]
        assert torch.equal(maps.weights[:, layer], own)


def test_open_clip_maps_keep_a_lora_adapters_effect(pixels):
    """The maps of a LoRA-tuned open_clip (peft target_parameters on in_proj) are the hand-merged model's."""
    import copy

    peft = pytest.importorskip("peft")
    from clipheads.explain.spatial import attention_maps

    base = tiny_model("open_clip", seed=3).model
    plain = copy.deepcopy(base)
    torch.manual_seed(3)
    names = [f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(2)]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=names, init_lora_weights=False)
    tuned = peft.get_peft_model(base, config).eval()
    merged = copy.deepcopy(plain)
    with torch.no_grad():
        for i, block in enumerate(tuned.base_model.model.visual.transformer.resblocks):
            wrapper = block.attn
            delta = wrapper.lora_B["default"].weight @ wrapper.lora_A["default"].weight * wrapper.scaling["default"]
            merged.visual.transformer.resblocks[i].attn.in_proj_weight += delta
    got = attention_maps(clipheads.load(tuned), pixels, [0, 1]).weights
    assert torch.allclose(got, attention_maps(clipheads.load(merged), pixels, [0, 1]).weights, atol=1e-6)
    assert (got - attention_maps(clipheads.load(plain), pixels, [0, 1]).weights).abs().max() > 1e-3


# ------------------------------------------------- the other families of the README's table
def _family(kind: str):
    from clipheads.models.tiny_copies import TINY_TIMM_CONFIGS, tiny_open_clip_copy, tiny_timm_open_clip

    if kind in TINY_TIMM_CONFIGS:
        return tiny_timm_open_clip(kind, seed=3)
    if kind in ("ViT-L-14-CLIPA", "coca_ViT-B-32"):
        return tiny_open_clip_copy(kind, seed=3)
    return tiny_model(kind, seed=3)


def _library_attentions(backend, pixels) -> list[torch.Tensor]:
    """Each layer's attention weights [B, H, T, T] as the library returns them: transformers' eager
    ``output_attentions=True`` (SigLIP 2 on its NaFlex patches, the towers through the vision tower), open_clip's
    ``nn.MultiheadAttention`` with ``need_weights=True`` on each block's input."""
    model = backend.model
    if backend.kind != "hf":
        weights = []
        for layer, block in enumerate(model.visual.transformer.resblocks):
            h = block.ln_1(backend.run_layers(backend.embed(pixels), 0, layer))
            weights.append(block.attn(h, h, h, need_weights=True, average_attn_weights=False)[1])
        return weights
    if type(model).__name__ == "CLIPTowers":
        return list(model.vision(pixel_values=pixels, output_attentions=True).attentions)
    if type(model).__name__ == "Siglip2Model":
        inputs = backend.naflex_inputs(pixels)
        return list(model.vision_model(inputs["pixel_values"], inputs["pixel_attention_mask"],
                                       inputs["spatial_shapes"], output_attentions=True).attentions)
    return list(model.vision_model(pixel_values=pixels, output_attentions=True).attentions)


@pytest.mark.parametrize("kind", ["altclip", "metaclip2", "siglip2", "towers", "ViT-L-14-CLIPA", "coca_ViT-B-32"])
def test_maps_under_ablation_are_the_librarys_own_on_every_family(kind, pixels):
    """clipheads' attention maps equal the library's own weights, unablated and under an identity ablation (the
    ablated head's map the identity matrix), on AltCLIP, MetaCLIP 2, SigLIP 2, the towers apart, CLIPA and CoCa."""
    from clipheads.explain.spatial import attention_maps

    backend = _family(kind)
    if backend.kind == "hf":  # eager: the attention implementation that returns weights
        (backend.model.vision if kind == "towers" else backend.model).set_attn_implementation("eager")
    mask = clipheads.HeadMask.from_heads([f"L{LAYER}.H{HEAD}"], backend)
    with torch.no_grad():
        own = _library_attentions(backend, pixels)
        with clipheads.ablate(backend, mask, op="identity"):
            own_ablated = _library_attentions(backend, pixels)
    maps = attention_maps(backend, pixels, [0, 1])
    ablated = attention_maps(backend, pixels, [0, 1], mask=mask, op="identity")
    for layer in (0, 1):
        assert (maps.weights[:, layer] - own[layer]).abs().max() <= 1e-6
        assert (ablated.weights[:, layer] - own_ablated[layer]).abs().max() <= 1e-6
    assert torch.equal(ablated.weights[:, LAYER, HEAD], torch.eye(own[0].shape[-1]).expand_as(own[0][:, HEAD]))
    assert (maps.weights[:, LAYER, HEAD] - ablated.weights[:, LAYER, HEAD]).abs().max() > 0.1
    assert torch.allclose(maps.weights.sum(-1), torch.ones(()))


@pytest.mark.parametrize("kind", ["ViT-B-16-SigLIP", "EVA02-B-16", "EVA01-g-14", "EVA02-E-14"])
def test_timm_maps_are_what_the_heads_read_under_ablation(kind, pixels):
    """timm returns no weights: the maps (timm's explicit-softmax formula, after q/k norms and EVA's rope) times the
    values are the per-head outputs timm's own forward computes (recorded by a head hook), and under an identity
    ablation the ablated head's map is the identity matrix, the others unchanged."""
    from clipheads.explain.spatial import attention_maps

    backend = _family(kind)
    seen = {}

    def record(z, v):
        seen["z"], seen["v"] = z, v
        return z

    with torch.no_grad():
        x = backend.run_layers(backend.embed(pixels), 0, LAYER)
        backend.set_head_hook(LAYER, record)
        try:
            backend.run_layers(x, LAYER, LAYER + 1)
        finally:
            backend.clear_head_hooks()
    maps = attention_maps(backend, pixels, [LAYER])
    read = maps.weights[:, 0] @ seen["v"].transpose(1, 2)  # [B, H, T, d]
    assert (read - seen["z"].transpose(1, 2)).abs().max() <= 1e-5 * seen["z"].abs().max()
    assert torch.allclose(maps.weights.sum(-1), torch.ones(()))
    mask = clipheads.HeadMask.from_heads([f"L{LAYER}.H{HEAD}"], backend)
    ablated = attention_maps(backend, pixels, [LAYER], mask=mask, op="identity")
    others = [h for h in range(backend.n_heads) if h != HEAD]
    assert torch.equal(ablated.weights[:, 0, others], maps.weights[:, 0, others])
    eye = torch.eye(maps.weights.shape[-1]).expand_as(maps.weights[:, 0, HEAD])
    assert torch.equal(ablated.weights[:, 0, HEAD], eye)
