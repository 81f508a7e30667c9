"""Tiny random open_clip models, copies of real configs at test size (tests, smoke runs): towers on timm trunks
(SigLIP, EVA02, EVA01) and open_clip ViT variants (CLIPA's average pooling, CoCa's attentional pooler).

``open_clip``'s ``TimmModel`` builds its trunk by timm model name only, so the small trunks are registered with timm
as model names of their own (``clipheads_tiny_<timm name>``) whose entry point is timm's own entry point of the real
model (same class, same blocks, same attention, pooling, rope and MLP options) with only the sizes overridden. The
open_clip config is the real one (``open_clip.get_model_config``) with that trunk name, a 32 px image and a small
text tower on CLIP's BPE (49408 words), so that no tokenizer has to be downloaded; the image tower is what is tested.
"""

from __future__ import annotations

import copy

import torch

from clipheads.models.openclip import OpenCLIPBackend
from clipheads.models.openclip_timm import OpenCLIPTimmBackend

__all__ = ["TINY_TIMM_CONFIGS", "TINY_VIT_CONFIGS", "register_tiny_timm", "tiny_open_clip_copy", "tiny_timm_open_clip"]

# open_clip config -> (its timm trunk, the sizes that make it tiny)
_TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
TINY_TIMM_CONFIGS = {
    "ViT-B-16-SigLIP": ("vit_base_patch16_siglip_224", _TINY),  # no class token, AttentionPoolLatent ("map")
    "EVA02-B-16": ("eva02_base_patch16_clip_224", {**_TINY, "ref_feat_shape": (4, 4)}),  # rope, SwiGLU, sub-LN
    "EVA01-g-14": ("eva_giant_patch14_224", _TINY),  # packed qkv with q/v biases (F.linear path), class token
    "EVA02-E-14": ("eva02_enormous_patch14_clip_224", _TINY),  # post-norm blocks (EvaBlockPostNorm), no rope
}
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}


def _tiny_name(timm_name: str) -> str:
    return f"clipheads_tiny_{timm_name}"


def register_tiny_timm(timm_name: str, sizes: dict) -> str:
    """Register ``clipheads_tiny_<timm_name>`` with timm (once) and return the name."""
    import timm
    from timm.models import register_model

    name = _tiny_name(timm_name)
    if timm.is_model(name):
        return name

    def entry(pretrained: bool = False, **kwargs):
        return timm.create_model(timm_name, pretrained=False, **{**sizes, **kwargs})

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    register_model(entry)
    return name


def tiny_timm_open_clip(config: str = "ViT-B-16-SigLIP", seed: int = 0) -> OpenCLIPTimmBackend:
    """A random open_clip model of ``config`` (a key of :data:`TINY_TIMM_CONFIGS`) at test size: 2 layers of 4 heads
    (head dim 16), 32 px images, built by ``open_clip.create_model(config, pretrained=None, ...)`` with the tiny
    trunk and text tower as overrides; wrapped in its backend (with CLIP's BPE tokenizer and the model's config)."""
    import open_clip

    if config not in TINY_TIMM_CONFIGS:
        raise ValueError(f"no tiny copy of {config!r}; choose one of {', '.join(TINY_TIMM_CONFIGS)}")
    timm_name, sizes = TINY_TIMM_CONFIGS[config]
    cfg = copy.deepcopy(open_clip.get_model_config(config))
    vision = {**cfg["vision_cfg"], "timm_model_name": register_tiny_timm(timm_name, sizes), "image_size": 32}
    cfg.update(embed_dim=sizes["embed_dim"], vision_cfg=vision, text_cfg=dict(_TEXT))
    torch.manual_seed(seed)
    overrides = {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg")}
    model = open_clip.create_model(config, pretrained=None, **overrides)
    return OpenCLIPTimmBackend(model.eval(), f"open_clip:{config}(tiny)",
                               tokenizer=open_clip.SimpleTokenizer(context_length=_TEXT["context_length"]),
                               model_cfg=cfg)


# open_clip VisionTransformer variants: the real vision options at test size (2 layers, 4 heads of 16, 32 px)
_VIT = {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8}
TINY_VIT_CONFIGS = {
    "ViT-L-14-CLIPA": {},  # class token kept but unused: average pooling, no ln_pre, LayerNorm after the pool
    "coca_ViT-B-32": {"attn_pooler_heads": 4, "attn_pooler_queries": 8},  # attentional pooler over all tokens
}


def tiny_open_clip_copy(config: str = "ViT-L-14-CLIPA", seed: int = 0, embed_dim: int = 64) -> OpenCLIPBackend:
    """A random open_clip model of ``config`` (a key of :data:`TINY_VIT_CONFIGS`) at test size, its vision options
    (``pool_type``, ``no_ln_pre``, ``final_ln_after_pool``, ``attentional_pool`` ...) as in the real config, the
    text tower (and CoCa's decoder) small on CLIP's BPE; built by ``open_clip.create_model`` and wrapped.
    ``embed_dim``: the joint embedding's size (the tower's width is 64; another size gives CoCa's pooler keys and
    values narrower or wider than its queries, as in the real ``coca_ViT-B-32``: 768 -> 512)."""
    import open_clip

    if config not in TINY_VIT_CONFIGS:
        raise ValueError(f"no tiny copy of {config!r}; choose one of {', '.join(TINY_VIT_CONFIGS)}")
    cfg = copy.deepcopy(open_clip.get_model_config(config))
    cfg["vision_cfg"] = {**cfg["vision_cfg"], **_VIT, **TINY_VIT_CONFIGS[config]}
    text = {k: v for k, v in cfg["text_cfg"].items() if k in ("embed_cls", "output_tokens")}
    cfg.update(embed_dim=embed_dim, text_cfg={**_TEXT, **text})
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"] = {**_TEXT, "layers": 1, "attn_pooler_heads": 4}
    torch.manual_seed(seed)
    overrides = {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg") if k in cfg}
    model = open_clip.create_model(config, pretrained=None, **overrides)
    return OpenCLIPBackend(model.eval(), f"open_clip:{config}(tiny)",
                           tokenizer=open_clip.SimpleTokenizer(context_length=_TEXT["context_length"]),
                           model_cfg=cfg)
