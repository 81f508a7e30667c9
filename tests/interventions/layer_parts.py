"""The modules of one image-encoder layer, read from the library's own model: the naive references of
``test_reference.py`` and ``test_patching.py`` rebuild a layer's attention from them."""

from __future__ import annotations

import torch


def layer_parts(backend, layer: int):
    """(ln1, q/k/v function, out_proj, ln2, mlp, ls1, ls2) of a layer, read from the library's modules."""
    if backend.kind == "hf":
        block = backend.model.vision_model.encoder.layers[layer]
        attn = block.self_attn

        def qkv(h):
            return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

        return block.layer_norm1, qkv, attn.out_proj, block.layer_norm2, block.mlp, (lambda t: t), (lambda t: t)
    block = backend.model.visual.transformer.resblocks[layer]

    def qkv(h):
        return torch.nn.functional.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)

    return block.ln_1, qkv, block.attn.out_proj, block.ln_2, block.mlp, block.ls_1, block.ls_2
