"""``open_clip`` backend: any model config with a ViT image tower (``VisionTransformer``).

open_clip's blocks call ``nn.MultiheadAttention``, which hides per-head outputs and, under inference mode, runs
a fused kernel in one call. A hooked layer therefore gets its own attention forward for that block, bound to the
instance (same weights, same ``scaled_dot_product_attention`` kernel) so that the hook can replace the outputs of
the ablated heads before ``out_proj``. Layers without a hook keep the library's module untouched, and removing
the hook deletes the instance attribute, restoring the class's own forward.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipheads.errors import ModelLoadError
from clipheads.models.base import Architecture, CLIPBackend, HeadHook, recall_input, remember_inputs
from clipheads.models.hf import offline_if_unreachable

PREFIX = "open_clip:"


def _hooked_mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` for self-attention, with the per-head hook before ``out_proj``."""
    if key is not query or value is not query or key_padding_mask is not None:
        raise NotImplementedError("clipheads hooks support self-attention without key padding masks only")
    x = query if self.batch_first else query.transpose(0, 1)
    batch, tokens, width = x.shape
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, T, d]
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    z = self._clipheads_hook(z.transpose(1, 2), v.transpose(1, 2))  # [B, T, H, d]
    out = self.out_proj(z.reshape(batch, tokens, width))
    return (out if self.batch_first else out.transpose(0, 1)), None


class OpenCLIPBackend(CLIPBackend):
    """An ``open_clip`` CLIP model with a ``VisionTransformer`` image tower."""

    kind = "open_clip"

    def __init__(self, model: nn.Module, name: str, preprocess=None, tokenizer=None,
                 model_cfg: dict | None = None) -> None:
        super().__init__(model, name)
        visual = getattr(model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "_embeds"):
            raise ModelLoadError(f"{name}: the image tower is {type(visual).__name__}, not an open_clip "
                                 "VisionTransformer (open_clip >= 3.0); clipheads needs a ViT image tower")
        if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
            raise ModelLoadError(f"{name}: its ViT blocks do not use nn.MultiheadAttention "
                                 "(custom attention blocks are not supported yet)")
        self._visual = visual
        self._blocks = blocks
        remember_inputs(model, preprocess=preprocess, tokenizer=tokenizer, model_cfg=model_cfg)
        self._preprocess = recall_input(model, "preprocess")
        self._tokenizer = recall_input(model, "tokenizer")

    @property
    def model_cfg(self) -> dict | None:
        """open_clip's model config of this model (``open_clip.get_model_config``), needed to save it."""
        return recall_input(self.model, "model_cfg")

    @property
    def architecture(self) -> Architecture:
        attn = self._blocks[0].attn
        return Architecture(len(self._blocks), attn.num_heads, attn.head_dim, attn.embed_dim,
                            name="open_clip:VisionTransformer")

    @property
    def image_size(self) -> int:
        size = self._visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    # ------------------------------------------------------------ inputs
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        if self._preprocess is None:
            import open_clip

            self._preprocess = open_clip.image_transform(self._visual.image_size, is_train=False)
        return self._preprocess(image.convert("RGB"))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            import open_clip

            # CLIP's BPE vocabulary ships inside open_clip
            self._tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=self.model.context_length)
        return {"text": self._tokenizer(list(texts))}

    # ----------------------------------------------------- library paths
    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["text"])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    # ------------------------------------------------- staged image tower
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._visual._embeds(pixels)

    def run_layers(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        batch_first = getattr(self._visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in self._blocks[start:end]:
            x = block(x)
        return x if batch_first else x.transpose(0, 1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self._visual._pool(x)
        return pooled @ self._visual.proj if self._visual.proj is not None else pooled

    # ------------------------------------- one layer in two steps (the search's fast path)
    @property
    def supports_layer_split(self) -> bool:
        from open_clip.transformer import ResidualAttentionBlock

        return all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") and b.attn._qkv_same_embed_dim
                   for b in self._blocks)

    @property
    def readout_tokens(self) -> int | None:
        visual = self._visual
        return 1 if visual.attn_pool is None and visual.pool_type == "tok" else None

    def layer_attention(self, layer: int, x: torch.Tensor, queries: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        block = self._blocks[layer]
        attn = block.attn
        h = block.ln_1(x)
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
        shape = (x.shape[0], -1, attn.num_heads, attn.head_dim)
        q = F.linear(h if queries is None else h[:, :queries], w_q, b_q).view(shape).transpose(1, 2)
        k = F.linear(h, w_k, b_k).view(shape).transpose(1, 2)
        v = F.linear(h, w_v, b_v).view(shape).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, k, v)
        return z.transpose(1, 2), v.transpose(1, 2)

    def layer_finish(self, layer: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        block = self._blocks[layer]
        x = x + block.ls_1(block.attn.out_proj(z.reshape(*z.shape[:2], -1)))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    # ----------------------------------------------------- attention sites
    def attention_module(self, layer: int) -> nn.Module:
        return self._blocks[layer].attn

    def _install(self, layer: int, hook: HeadHook) -> None:
        attn = self.attention_module(layer)
        attn._clipheads_hook = hook
        attn.forward = types.MethodType(_hooked_mha_forward, attn)

    def _uninstall(self, layer: int) -> None:
        attn = self.attention_module(layer)
        for name in ("forward", "_clipheads_hook"):
            if name in attn.__dict__:
                delattr(attn, name)


def parse_open_clip_name(name: str) -> tuple[str, str | None]:
    """``"open_clip:ViT-B-32/openai"`` -> ``("ViT-B-32", "openai")``; the part after the first ``/`` is a
    pretrained tag or a checkpoint path. ``hf-hub:`` and ``local-dir:`` names are passed through whole."""
    spec = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    arch, _, pretrained = spec.partition("/")
    return arch, (pretrained or None)


TINY_OPEN_CLIP = "ClipHeads-Tiny-ViT"


def register_open_clip_configs() -> None:
    """Make open_clip know the tiny test architecture shipped with clipheads (``ClipHeads-Tiny-ViT``)."""
    import open_clip

    if TINY_OPEN_CLIP not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).resolve().parent.parent / "assets" / "open_clip_configs")


def load_open_clip(name: str, device=None, dtype=None, pretrained: str | None = None) -> OpenCLIPBackend:
    import open_clip

    register_open_clip_configs()
    arch, tag = parse_open_clip_name(name)
    pretrained = pretrained or tag
    if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models() "
                             "(e.g. open_clip:ViT-B-32 or open_clip:ViT-B-32/openai)")
    if pretrained and not Path(pretrained).exists() and arch in open_clip.list_models():
        known = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in known:
            raise ModelLoadError(f"{name}: {pretrained!r} is neither a checkpoint file nor a pretrained tag of "
                                 f"{arch} (tags: {', '.join(known) or 'none'})")
    try:
        with offline_if_unreachable():
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(arch)
            model_cfg = open_clip.get_model_config(arch)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise ModelLoadError(
            f"cannot load {name!r} ({reason}); without network access give a local checkpoint "
            f"(open_clip:{arch}/path/to/weights.pt), a local-dir: folder, or pre-download the weights into the "
            "Hugging Face cache and set HF_HUB_OFFLINE=1") from None
    model.eval().to(device=device, dtype=dtype)
    return OpenCLIPBackend(model, name if name.startswith(PREFIX) else PREFIX + name,
                           preprocess=preprocess, tokenizer=tokenizer, model_cfg=model_cfg)
