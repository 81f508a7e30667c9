"""Adapter-tuned models (peft): ablation keeps the adapter's effect on every backend, or refuses in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import clipheads
from clipheads.errors import ClipHeadsError
from clipheads.models.random_init import tiny_model

peft = pytest.importorskip("peft")
HEADS = "L0.H1,L1.H3"


def _lora(model: nn.Module, kind: str, how: str) -> nn.Module:
    """peft LoRA with random (non-zero) B, so that the adapter changes the output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    if kind != "open_clip":
        targets = r".*vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj|out_proj)"
        config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    elif how == "mha":  # peft's own nn.MultiheadAttention support (in_proj and out_proj)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=r"visual\.transformer\.resblocks\.\d+\.attn",
                            init_lora_weights=False)
    else:  # LoRA on the packed q/k/v parameter
        names = [f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(2)]
        config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=names, init_lora_weights=False)
    return get_peft_model(model, config).eval()


def _hand_merged_hf(tuned, base: nn.Module) -> nn.Module:
    """The base model with every LoRA layer's ``W + scaling * B @ A`` written into a plain copy by hand."""
    merged = copy.deepcopy(base)
    plain = dict(merged.named_modules())
    with torch.no_grad():
        for name, module in tuned.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                plain[name].weight += delta
    return merged


def _hand_merged_open_clip_in_proj(tuned, base: nn.Module) -> nn.Module:
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for i, block in enumerate(tuned.base_model.model.visual.transformer.resblocks):
            wrapper = block.attn
            delta = wrapper.lora_B["default"].weight @ wrapper.lora_A["default"].weight * wrapper.scaling["default"]
            merged.visual.transformer.resblocks[i].attn.in_proj_weight += delta
    return merged


CASES = [("hf", "linear"), ("chinese", "linear"), ("open_clip", "mha"), ("open_clip", "in_proj")]


@pytest.mark.parametrize(("kind", "how"), CASES)
def test_noop_ablation_keeps_the_adapter(kind, how, pixels):
    backend = tiny_model(kind, seed=2)
    base = copy.deepcopy(backend.model)
    tuned = clipheads.load(_lora(backend.model, kind, how))
    with torch.inference_mode():
        untuned = clipheads.load(base).encode_image(pixels)
        reference = tuned.encode_image(pixels)
        assert (reference - untuned).norm() / untuned.norm() > 0.05  # the adapter does change the output
        mask = clipheads.HeadMask.from_heads(HEADS, tuned)
        with clipheads.ablate(tuned, mask, op="scale", alpha=1.0):
            assert tuned.hooked_layers == [0, 1]
            out = tuned.encode_image(pixels)
        # the backend built before peft injected its layers (in place) sees the adapters as well
        with clipheads.ablate(backend, mask, op="scale", alpha=1.0):
            out_prebuilt = backend.encode_image(pixels)
    assert (out - reference).abs().max() <= 1e-5
    assert (out_prebuilt - reference).abs().max() <= 1e-5


@pytest.mark.parametrize(("kind", "how"), [c for c in CASES if c[1] != "mha"])
def test_zero_ablation_equals_zero_ablation_of_hand_merged_model(kind, how, pixels):
    backend = tiny_model(kind, seed=2)
    base = copy.deepcopy(backend.model)
    tuned_model = _lora(backend.model, kind, how)
    merged = (_hand_merged_hf if kind != "open_clip" else _hand_merged_open_clip_in_proj)(tuned_model, base)
    tuned, plain = clipheads.load(tuned_model), clipheads.load(merged)
    with torch.inference_mode():
        assert (tuned.encode_image(pixels) - plain.encode_image(pixels)).abs().max() <= 1e-5
        mask = clipheads.HeadMask.from_heads(HEADS, tuned)
        with clipheads.ablate(tuned, mask, op="zero"):
            out = tuned.encode_image(pixels)
        with clipheads.ablate(plain, mask, op="zero"):
            expected = plain.encode_image(pixels)
        assert (out - plain.encode_image(pixels)).abs().max() > 1e-3  # the ablation did something
    assert (out - expected).abs().max() <= 1e-5


def test_peft_multihead_attention_lora_ablates_like_its_merged_model(pixels):
    """peft's lora.MultiheadAttention: ablation equals ablation of the model peft's own merge_and_unload() gives."""
    backend = tiny_model("open_clip", seed=2)
    tuned_model = _lora(backend.model, "open_clip", "mha")
    merged = clipheads.load(copy.deepcopy(tuned_model).merge_and_unload())
    tuned = clipheads.load(tuned_model)
    mask = clipheads.HeadMask.from_heads(HEADS, tuned)
    with torch.inference_mode():
        with clipheads.ablate(tuned, mask, op="zero"):
            out = tuned.encode_image(pixels)
        with clipheads.ablate(merged, mask, op="zero"):
            expected = merged.encode_image(pixels)
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("kind", "how"), [("hf", "linear"), ("open_clip", "mha")])
def test_out_proj_with_adapter_refuses_bake_in_one_line(kind, how):
    tuned = clipheads.load(_lora(tiny_model(kind, seed=2).model, kind, how))
    mask = clipheads.HeadMask.from_heads(HEADS, tuned)
    with pytest.raises(ClipHeadsError, match="carries an adapter") as info:
        clipheads.bake(tuned, mask, op="zero")
    assert "\n" not in str(info.value)


def test_open_clip_adapters_disable_the_layer_split(pixels):
    tuned = clipheads.load(_lora(tiny_model("open_clip", seed=2).model, "open_clip", "in_proj"))
    assert not tuned.supports_layer_split
    with torch.inference_mode():  # the read-out path then falls back to the library's forward
        assert (tuned.encode_image_readout(pixels) - tuned.encode_image(pixels)).abs().max() <= 1e-6


def test_unknown_attention_wrapper_is_refused_in_one_line():
    backend = tiny_model("open_clip")

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    model = copy.deepcopy(backend.model)
    model.visual.transformer.resblocks[1].attn = Wrapper(model.visual.transformer.resblocks[1].attn)
    with pytest.raises(clipheads.ModelLoadError, match="block 1's attention is .*Wrapper") as info:
        clipheads.load(model)
    assert "\n" not in str(info.value)
