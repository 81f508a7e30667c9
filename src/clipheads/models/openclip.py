"""``open_clip`` backend: any model config with a ViT image tower (``VisionTransformer``).

open_clip's blocks call ``nn.MultiheadAttention``, which hides per-head outputs and, under inference mode, runs
a fused kernel in one call. A hooked layer therefore gets its own attention forward for that block, bound to the
instance (same weights, same ``scaled_dot_product_attention`` kernel) so that the hook can replace the outputs of
the ablated heads before ``out_proj``. Layers without a hook keep the library's module untouched, and removing
the hook deletes the instance attribute, restoring the class's own forward. With peft's LoRA on the attention
(``lora.MultiheadAttention`` or ``target_parameters``), the hook goes on the wrapped ``nn.MultiheadAttention``, so it
runs inside peft's forward with the adapted weights.
"""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize

from clipheads.errors import ClipHeadsError, ModelLoadError
from clipheads.models.base import (
    Architecture,
    CLIPBackend,
    HeadHook,
    hooked_weights,
    recall_input,
    remember_inputs,
)

PREFIX = "open_clip:"


def _hooked_mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` for self-attention, with the per-head hook before ``out_proj``.

    Same arguments and masks as the module it replaces (boolean or additive ``attn_mask`` of shape ``[T, T]`` or
    ``[B*H, T, T]``, ``key_padding_mask [B, T]``, ``is_causal``, batched or unbatched input, dropout in training);
    it reads the weights as the module does (``in_proj_weight``, ``out_proj.weight``), so adapters that merge or
    parametrize them (peft's LoRA) keep their effect. With ``need_weights=True`` it also returns the attention weights
    as the module does (``[B, T, T]`` averaged over heads, or ``[B, H, T, T]`` with ``average_attn_weights=False``;
    unbatched without ``B``): the module's own computation of them (one more attention pass, only when asked), with
    the ablated heads' maps showing what the operator did (``Operator.mix_attention``: identity -> the identity
    matrix). Cross-attention, and weights under attention dropout in training (they would not be the ones the output
    used), are refused in one line.
    """
    if key is not query or value is not query:
        raise ClipHeadsError("a clipheads-hooked nn.MultiheadAttention supports self-attention only (query, key and "
                             "value the same tensor)")
    weights = None
    if need_weights:
        if self.training and self.dropout > 0:
            raise ClipHeadsError("a clipheads-hooked nn.MultiheadAttention returns no attention weights under "
                                 "attention dropout in training mode; call model.eval() or pass need_weights=False")
        _, weights = type(self).forward(self, query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                        attn_mask=attn_mask, average_attn_weights=False, is_causal=is_causal)
        weights = hooked_weights(self._clipheads_hook, weights)  # [B, H, T, T] or [H, T, T]
        if average_attn_weights:
            weights = weights.mean(dim=-3)
    unbatched = query.dim() == 2
    x = query.unsqueeze(0) if unbatched else (query if self.batch_first else query.transpose(0, 1))
    if unbatched and key_padding_mask is not None:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    batch, tokens, width = x.shape
    # masks exactly as torch.nn.functional.multi_head_attention_forward reads them (bool: True = not allowed)
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=x.dtype)
    if is_causal and attn_mask is None:
        raise ClipHeadsError("is_causal=True needs attn_mask (the causal mask), as nn.MultiheadAttention does")
    use_causal = is_causal and key_padding_mask is None  # torch then drops attn_mask for the is_causal hint
    mask = None
    if not use_causal:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=x.dtype, check_other=False)
        if attn_mask is not None:
            mask = attn_mask.view(batch, self.num_heads, tokens, tokens) if attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, tokens)
            mask = padding if mask is None else mask + padding
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, T, d]
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=use_causal,
                                       dropout_p=self.dropout if self.training else 0.0)
    z = self._clipheads_hook(z.transpose(1, 2), v.transpose(1, 2))  # [B, T, H, d]
    out = F.linear(z.reshape(batch, tokens, width), self.out_proj.weight, self.out_proj.bias)
    if unbatched:
        return out.squeeze(0), weights
    return (out if self.batch_first else out.transpose(0, 1)), weights


# peft wrappers around nn.MultiheadAttention whose forward calls the wrapped module with the adapted weights merged
# (lora.MultiheadAttention) or parametrized (lora.ParamWrapper, ``target_parameters``): a hook on the wrapped module
# runs inside them and keeps the adapter's effect
_PEFT_MHA_WRAPPERS = ("MultiheadAttention", "ParamWrapper")


def base_attention(attn: nn.Module, where: str = "") -> nn.MultiheadAttention:
    """The ``nn.MultiheadAttention`` of a ViT block, inside any peft LoRA wrappers (which keep their effect when the
    hook sits on the wrapped module); any other wrapper or attention class raises :class:`ModelLoadError`."""
    module = attn
    while not isinstance(module, nn.MultiheadAttention):
        base = getattr(module, "base_layer", None)
        if not (type(module).__module__.startswith("peft.tuners.lora") and type(module).__name__ in _PEFT_MHA_WRAPPERS
                and isinstance(base, nn.Module)):
            kind = f"{type(module).__module__}.{type(module).__name__}"
            raise ModelLoadError(f"{where}attention is {kind}, not nn.MultiheadAttention or peft's LoRA on it "
                                 "(lora.MultiheadAttention, target_parameters); clipheads cannot hook it exactly")
        module = base
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise ModelLoadError(f"{where}nn.MultiheadAttention with separate key/value sizes, bias_k/bias_v or "
                             "add_zero_attn is not supported")
    return module


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
        for i, block in enumerate(blocks):
            base_attention(getattr(block, "attn", None), f"{name}: block {i}'s ")
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
        attn = self.attention_module(0)
        return Architecture(len(self._blocks), attn.num_heads, attn.head_dim, attn.embed_dim,
                            name="open_clip:VisionTransformer")

    @property
    def image_size(self) -> int:
        size = self._visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    # ------------------------------------------------------------ inputs
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        if self._preprocess is None:
            self._preprocess = model_preprocess(self.model, self.name)
        return self._preprocess(image.convert("RGB"))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            self._tokenizer = model_tokenizer(self.model, self.name)
        return {"text": self._tokenizer(list(texts))}

    # ----------------------------------------------------- library paths
    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=False)  # CoCa's encode_image normalises by default

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

        # adapters (peft wrappers, parametrized weights) run only inside the library's forward: no split then
        return all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                   and isinstance(b.attn, nn.MultiheadAttention) and b.attn._qkv_same_embed_dim
                   and not _adapted(b.attn) for b in self._blocks)

    @property
    def readout_tokens(self) -> int | None:
        visual = self._visual
        return 1 if visual.attn_pool is None and visual.pool_type == "tok" else None

    def attention_pool(self):
        """CoCa's ``AttentionalPooler`` at the query that makes the contrastive embedding (query 0, then ``ln_post``
        and ``proj``), as :meth:`clipheads.models.pooling.AttentionPool.from_open_clip`; ``None`` for towers without
        one (class token, CLIPA's average pool).

        Raises:
            ClipHeadsError: open_clip's two-pooler layouts (``attentional_pool='parallel'``/``'cascade'``, marked WIP
                upstream) or a pool over several queries (``pool_type`` ``'avg'``/``'none'`` after the pooler).
        """
        visual = self._visual
        if visual.attn_pool is None:
            return None
        from clipheads.models.pooling import AttentionPool

        if getattr(visual, "attn_pool_contrastive", None) is not None or visual.pool_type != "tok":
            layout = getattr(visual, "attn_pool_type", "") or f"pool_type {visual.pool_type!r}"
            raise ClipHeadsError(f"{self.name}: the attentional pooler's {layout} layout reads the pooler through "
                                 "more than one query or norm; the decomposition reads one query (CoCa's)")
        return AttentionPool.from_open_clip(visual.attn_pool, visual.ln_post, visual.proj)

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
    def attention_module(self, layer: int) -> nn.MultiheadAttention:
        """Layer ``layer``'s ``nn.MultiheadAttention`` (inside peft's LoRA wrappers, if any)."""
        return base_attention(self._blocks[layer].attn, f"{self.name}: block {layer}'s ")

    def attention_weights(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self._blocks[layer]
        h = block.ln_1(x)
        if not self.attention_module(layer).batch_first:
            h = h.transpose(0, 1)
        # the block's module as the block calls it (peft's wrapper, if any); a hooked layer's forward maps the weights
        _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
        return weights

    def _install(self, layer: int, hook: HeadHook) -> None:
        attn = self.attention_module(layer)
        attn._clipheads_hook = hook
        attn.forward = types.MethodType(_hooked_mha_forward, attn)

    def _uninstall(self, layer: int) -> None:
        attn = self.attention_module(layer)
        for name in ("forward", "_clipheads_hook"):
            if name in attn.__dict__:
                delattr(attn, name)


CLIP_BPE_VOCAB = 49408  # open_clip's SimpleTokenizer (CLIP's BPE): every built-in text tower without an HF tokenizer


def model_preprocess(model: nn.Module, name: str):
    """The image transform of a built open_clip model from its own preprocessing config (``preprocess_cfg``, set by
    ``open_clip.create_model``: size, mean/std, resize mode, interpolation), as ``create_model_and_transforms`` builds
    it; :class:`ModelLoadError` when the model carries none (built by hand): pass ``preprocess=`` then."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = open_clip.get_model_preprocess_cfg(model)
    if "mean" not in cfg or "std" not in cfg:
        raise ModelLoadError(f"{name}: the model carries no preprocessing config (mean/std); pass its transform: "
                             "clipheads.load(model, preprocess=...) (from open_clip.create_model_and_transforms)")
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def model_tokenizer(model: nn.Module, name: str):
    """CLIP's BPE at the model's context length when its text tower is open_clip's own ``TextTransformer`` with CLIP's
    49408-word vocabulary (``open_clip.get_model_tokenize_cfg``); any other text tower raises
    :class:`ModelLoadError` asking for ``tokenizer=open_clip.get_tokenizer(<its config>)``."""
    import open_clip

    cfg = open_clip.get_model_tokenize_cfg(model)
    text = getattr(model, "text", model)
    if cfg.get("vocab_size") == CLIP_BPE_VOCAB and hasattr(text, "token_embedding") and "context_length" in cfg:
        return open_clip.SimpleTokenizer(context_length=cfg["context_length"])
    raise ModelLoadError(f"{name}: its text tower ({type(text).__name__}, vocabulary {cfg.get('vocab_size', '?')}) "
                         "is not tokenised with CLIP's BPE; pass its tokenizer: clipheads.load(model, "
                         "tokenizer=open_clip.get_tokenizer('<its model config>'))")


def _adapted(module: nn.Module) -> bool:
    """Whether ``module`` or one of its sub-modules has parametrized weights (an adapter applied on access)."""
    return any(parametrize.is_parametrized(m) for m in module.modules())


def parse_open_clip_name(name: str) -> tuple[str, str | None]:
    """``"open_clip:ViT-B-32/openai"`` -> ``("ViT-B-32", "openai")``; the part after the first ``/`` is a
    pretrained tag or a checkpoint path. ``hf-hub:`` and ``local-dir:`` names are passed through whole."""
    spec = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    arch, _, pretrained = spec.partition("/")
    return arch, (pretrained or None)


def _local_first(arch: str, pretrained: str | None, cache_dir: str | os.PathLike | None = None
                 ) -> tuple[str, str | None, dict]:
    """``(model name, pretrained, extra create_model arguments)`` that read the Hugging Face cache when it holds the
    files (an ``hf-hub:`` repo as a ``local-dir:`` snapshot; a tag's weights as a file, with the tag's preprocessing
    config), else the names as given, which open_clip downloads; a cache miss raises at once when the Hub cannot be
    reached. ``huggingface_hub``'s process-wide settings are never changed."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import merge_preprocess_dict

    from clipheads.models.hf import _hub_reachable

    if arch.startswith("hf-hub:"):
        try:
            folder = Path(snapshot_download(arch[len("hf-hub:"):], local_files_only=True, cache_dir=cache_dir))
        except Exception:
            if not _hub_reachable():
                raise
        else:
            if (folder / "open_clip_config.json").exists():
                return f"local-dir:{folder}", pretrained, {}
        return arch, pretrained, {}
    cfg = get_pretrained_cfg(arch, pretrained) if pretrained and not Path(pretrained).exists() else {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # as open_clip's download_pretrained splits it
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for filename in names:
            try:
                path = hf_hub_download(repo, filename, local_files_only=True, cache_dir=cache_dir)
            except Exception:  # noqa: BLE001 - not in the cache under this name
                continue
            return arch, path, {"force_preprocess_cfg": merge_preprocess_dict({}, cfg)}
        if not _hub_reachable():
            raise ModelLoadError(f"the weights of tag {pretrained!r} ({repo}) are not in the Hugging Face cache and "
                                 "the Hub cannot be reached")
    return arch, pretrained, {}


TINY_OPEN_CLIP = "ClipHeads-Tiny-ViT"


def register_open_clip_configs() -> None:
    """Make open_clip know the tiny test architecture shipped with clipheads (``ClipHeads-Tiny-ViT``)."""
    import open_clip

    if TINY_OPEN_CLIP not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).resolve().parent.parent / "assets" / "open_clip_configs")


def load_open_clip(name: str, device=None, dtype=None, pretrained: str | None = None, *, precision: str | None = None,
                   force_image_size: int | tuple[int, int] | None = None, force_quick_gelu: bool | None = None,
                   cache_dir: str | os.PathLike | None = None) -> OpenCLIPBackend:
    """An open_clip model by name (see :func:`clipheads.load`); ``precision``, ``force_image_size``,
    ``force_quick_gelu`` and ``cache_dir`` go to ``open_clip.create_model_and_transforms`` as they are, and the model
    is built on ``device`` there."""
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
        source, checkpoint, extra = _local_first(arch, pretrained, cache_dir)
        options = dict(precision=precision, force_image_size=force_image_size, force_quick_gelu=force_quick_gelu,
                       cache_dir=None if cache_dir is None else str(cache_dir),
                       device=None if device is None else str(device))
        extra.update({k: v for k, v in options.items() if v is not None})
        model, _, preprocess = open_clip.create_model_and_transforms(source, pretrained=checkpoint, **extra)
        model_cfg = open_clip.get_model_config(source)  # a cached hf-hub repo: its local copy, no download
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise ModelLoadError(
            f"cannot load {name!r} ({reason}); without network access give a local checkpoint "
            f"(open_clip:{arch}/path/to/weights.pt), a local-dir: folder, or pre-download the weights into the "
            "Hugging Face cache") from None
    try:
        tokenizer = open_clip.get_tokenizer(source)
    except Exception as exc:  # noqa: BLE001 - e.g. a SigLIP config's Hugging Face tokenizer, not in the cache offline
        hf_tokenizer = ((model_cfg or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        where = f"its Hugging Face tokenizer {hf_tokenizer!r}" if hf_tokenizer else "its tokenizer"
        raise ModelLoadError(
            f"cannot load {name!r}: the model was built, but {where} could not be loaded ({reason}); without network "
            f"access pre-download it into the Hugging Face cache, or build the model with open_clip and pass it with "
            "its tokenizer: clipheads.load(model, tokenizer=...)") from None
    model.eval().to(device=device, dtype=dtype)
    return open_clip_backend(model, name if name.startswith(PREFIX) else PREFIX + name,
                             preprocess=preprocess, tokenizer=tokenizer, model_cfg=model_cfg)


def open_clip_backend(model: nn.Module, name: str, **inputs) -> OpenCLIPBackend:
    """The backend of a built open_clip model: :class:`OpenCLIPTimmBackend` for a tower on a timm trunk
    (``model.visual.trunk``), else :class:`OpenCLIPBackend`; ``inputs`` are their ``preprocess``, ``tokenizer`` and
    ``model_cfg``."""
    from clipheads.models.openclip_timm import OpenCLIPTimmBackend, is_timm_tower

    if is_timm_tower(model):
        return OpenCLIPTimmBackend(model, name, **inputs)
    return OpenCLIPBackend(model, name, **inputs)
