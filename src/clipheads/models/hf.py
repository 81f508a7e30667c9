"""Hugging Face ``transformers`` backends: ``CLIPModel``, ``ChineseCLIPModel``, ``AltCLIPModel``, ``MetaClip2Model``
(one class, :class:`HFBackend`), ``SiglipModel`` (:class:`SiglipBackend`), ``Siglip2Model`` (:class:`Siglip2Backend`)
and the two towers used apart, ``CLIPVisionModelWithProjection`` + ``CLIPTextModelWithProjection``
(:class:`CLIPTowers`, :class:`HFTowersBackend`).

Head hooks use the official extension point of ``transformers``: an attention function registered with
``AttentionInterface`` under the name ``"clipheads"``. While at least one layer is hooked, the vision tower's
config selects it; it calls the implementation the model was using (``sdpa`` by default, fused kernel; ``eager``
through the model's own ``eager_attention_forward``) and then lets the layer's hook replace the outputs of the
ablated heads. Layers without a hook run that implementation unchanged, and an ``eager`` model still returns its
attention weights (``output_attentions=True``), the ablated heads' maps showing what the operator did. Without hooks
the vision tower is switched back to its own implementation, so an untouched model runs exactly the library's code.
"""

from __future__ import annotations

import inspect
import math
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from clipheads.errors import ClipHeadsError, ModelLoadError
from clipheads.models.base import Architecture, CLIPBackend, HeadHook, hooked_weights, recall_input, remember_inputs

ATTENTION_NAME = "clipheads"


def _clipheads_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Attention function for ``AttentionInterface``: the model's own implementation (``module._clipheads_inner``:
    ``sdpa``, ``eager``, ...), then the layer's head hook on the outputs ``[B, T, H, d]`` and, when the implementation
    returns attention weights ``[B, H, T, T]`` (eager), the hook's map of them (an ablated head's map shows what its
    operator did, see :meth:`clipheads.interventions.operators.Operator.mix_attention`).

    Raises:
        ClipHeadsError: ``output_attentions=True`` while the model's implementation returns no weights (sdpa, flash):
            one line asking for eager attention instead of the library's empty tuple.
    """
    inner = getattr(module, "_clipheads_inner", None) or ALL_ATTENTION_FUNCTIONS["sdpa"]
    out, weights = inner(module, query, key, value, attention_mask, **kwargs)  # out: [B, T, H, d]
    if weights is None and kwargs.get("output_attentions"):
        raise ClipHeadsError(f"output_attentions=True: this model runs {getattr(module, '_clipheads_impl', 'sdpa')} "
                             "attention, which returns no attention weights; use eager attention: "
                             "model.set_attn_implementation('eager'), or from_pretrained(..., "
                             "attn_implementation='eager') and clipheads.load(model)")
    hook = getattr(module, "_clipheads_hook", None)
    if hook is not None:
        out = hook(out, value.transpose(1, 2))
        weights = hooked_weights(hook, weights)
    return out, weights


def _eager_function(module: nn.Module):
    """The ``eager_attention_forward`` of ``module``'s own modeling file (what the model runs as ``eager``)."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise ModelLoadError(f"{type(module).__name__}: its modeling module has no eager_attention_forward; clipheads "
                             "cannot run its eager attention")
    return function


AttentionInterface.register(ATTENTION_NAME, _clipheads_attention)

# id(config) -> the implementation whose kernel runs inside "clipheads" for the layers of that config (while hooked)
_INNER_OF_CONFIG: dict[int, str] = {}


def _clipheads_mask(*args, config=None, **kwargs):
    """Mask function for ``AttentionMaskInterface``: the padding mask in the format of the kernel that runs inside
    ``"clipheads"``. Without one, transformers treats a custom attention as needing no mask and drops the padding mask
    (SigLIP 2's NaFlex padding would then be attended to, and read by its pooling head)."""
    inner = _INNER_OF_CONFIG.get(id(config), "sdpa")
    return ALL_MASK_ATTENTION_FUNCTIONS[inner](*args, config=config, **kwargs)


AttentionMaskInterface.register(ATTENTION_NAME, _clipheads_mask)


def _get_features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFBackend(CLIPBackend):
    """A ``transformers`` dual encoder that pools its class token: ``CLIPModel``, ``ChineseCLIPModel``, ``AltCLIPModel``
    (XLM-R text tower), ``MetaClip2Model``; their vision towers share CLIP's layer and attention code (q/k/v/out_proj,
    the attention interface)."""

    kind = "hf"

    def __init__(self, model: nn.Module, name: str, tokenizer=None, image_processor=None) -> None:
        super().__init__(model, name)
        if not hasattr(model, "vision_model") or not self._has_readout(model):
            raise ModelLoadError(f"{name}: {type(model).__name__} is not a CLIP model with a vision tower")
        remember_inputs(model, tokenizer=tokenizer, image_processor=image_processor)
        self.tokenizer = recall_input(model, "tokenizer")
        self.image_processor = recall_input(model, "image_processor")
        self._vision = model.vision_model
        self._layers = self._vision.encoder.layers
        params = inspect.signature(self._layers[0].forward).parameters
        self._layer_extra_args = (None,) if "causal_attention_mask" in params else ()  # transformers 4.x

    @staticmethod
    def _has_readout(model: nn.Module) -> bool:
        return hasattr(model, "visual_projection")

    @property
    def architecture(self) -> Architecture:
        cfg = self._vision.config
        return Architecture(cfg.num_hidden_layers, cfg.num_attention_heads,
                            cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size,
                            name=f"hf:{type(self.model).__name__}")

    @property
    def image_size(self) -> int:
        return int(self._vision.config.image_size)

    # ------------------------------------------------------------ inputs
    def _processor(self):
        if self.image_processor is None:
            from transformers import CLIPImageProcessor

            size = self.image_size
            self.image_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                      crop_size={"height": size, "width": size})
        return self.image_processor

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._processor()(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ModelLoadError(f"{self.name}: no tokenizer was found with this model; load it from a folder "
                                 "that has tokenizer files (clipheads.save writes them) or pass tokenizer= to "
                                 "HFBackend")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self._text_max_length(),
                                return_tensors="pt")
        return dict(tokens)

    def _text_positions(self) -> int:
        config = self.model.config.text_config
        positions = int(getattr(config, "max_position_embeddings", 77))
        if config.model_type == "altclip_text_model":  # RoBERTa: position ids start after the padding index
            positions -= int(config.pad_token_id) + 1
        return positions

    def _text_max_length(self) -> int:
        """Tokens per text: the text tower's positions, or the tokenizer's ``model_max_length`` when smaller (an
        XLM-R tower such as AltCLIP's has 514 positions for 512 tokens)."""
        limit = getattr(self.tokenizer, "model_max_length", None)
        positions = self._text_positions()
        return int(limit) if isinstance(limit, int) and 0 < limit < positions else positions

    # ----------------------------------------------------- library paths
    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _get_features(self.model.get_image_features(pixel_values=pixels))

    def _encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _get_features(self.model.get_text_features(**tokens))

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    # ------------------------------------------------- staged image tower
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._vision.pre_layrnorm(self._vision.embeddings(pixels))

    def run_layers(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        for layer in self._layers[start:end]:
            x = layer(x, None, *self._layer_extra_args)
            if isinstance(x, tuple):
                x = x[0]
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self._vision.post_layernorm(x[:, 0, :]))

    # ------------------------------------- one layer in two steps (the search's fast path)
    @property
    def supports_layer_split(self) -> bool:
        names = ("q_proj", "k_proj", "v_proj", "out_proj", "scale", "num_heads", "head_dim")
        return all(hasattr(layer, "layer_norm1") and hasattr(layer, "layer_norm2") and hasattr(layer, "mlp")
                   and all(hasattr(layer.self_attn, n) for n in names) for layer in self._layers)

    @property
    def readout_tokens(self) -> int | None:
        return 1  # pool: post_layernorm of the class token

    def layer_attention(self, layer: int, x: torch.Tensor, queries: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        attn, q, k, v = self._qkv(layer, x, queries)
        z = nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        return z.transpose(1, 2), v.transpose(1, 2)

    def _qkv(self, layer: int, x: torch.Tensor, queries: int | None = None):
        """The attention module of ``layer`` and its queries (of the first ``queries`` tokens, or all), keys and
        values of ``x`` ``[B, T, W]``, each ``[B, H, T, d]``."""
        block = self._layers[layer]
        attn = block.self_attn
        h = block.layer_norm1(x)
        shape = (x.shape[0], -1, attn.num_heads, attn.head_dim)
        q = attn.q_proj(h if queries is None else h[:, :queries]).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        return attn, q, k, v

    def layer_finish(self, layer: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        block = self._layers[layer]
        x = x + block.self_attn.out_proj(z.reshape(*z.shape[:2], -1))
        return x + block.mlp(block.layer_norm2(x))

    # ----------------------------------------------------- attention sites
    def attention_module(self, layer: int) -> nn.Module:
        return self._layers[layer].self_attn

    def _set_impl(self, name: str) -> None:
        if hasattr(self._vision, "set_attn_implementation"):
            self._vision.set_attn_implementation(name)
        else:  # older transformers
            self._vision.config._attn_implementation = name
        # composite models (e.g. VisionEncoderDecoderModel) can leave layers holding another config object
        for i in range(self.n_layers):
            config = self.attention_module(i).config
            if config is not self._vision.config:
                config._attn_implementation = name

    def _install(self, layer: int, hook: HeadHook) -> None:
        if "_clipheads_own_impl" not in self._vision.__dict__:
            own = self._vision.config._attn_implementation or "sdpa"
            self._vision.__dict__["_clipheads_own_impl"] = own
            for i in range(self.n_layers):
                module = self.attention_module(i)
                # the function the layer runs without clipheads: a registered one, or the model's own eager code
                module._clipheads_inner = (ALL_ATTENTION_FUNCTIONS[own] if own != "eager" and own in
                                           ALL_ATTENTION_FUNCTIONS else _eager_function(module))
                module._clipheads_impl = own
            mask_kind = own if own in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
            for config in {id(c): c for c in (self._vision.config, self.attention_module(0).config)}.values():
                _INNER_OF_CONFIG[id(config)] = mask_kind
            self._set_impl(ATTENTION_NAME)
        self.attention_module(layer)._clipheads_hook = hook

    def _uninstall(self, layer: int) -> None:
        module = self.attention_module(layer)
        if hasattr(module, "_clipheads_hook"):
            del module._clipheads_hook
        if not self.hooked_layers and "_clipheads_own_impl" in self._vision.__dict__:
            self._set_impl(self._vision.__dict__.pop("_clipheads_own_impl"))
            for i in range(self.n_layers):
                del self.attention_module(i)._clipheads_inner
                del self.attention_module(i)._clipheads_impl
            for config in (self._vision.config, self.attention_module(0).config):
                _INNER_OF_CONFIG.pop(id(config), None)

    def attention_weights(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        attn, q, k, v = self._qkv(layer, x)
        _, weights = _eager_function(attn)(attn, q, k, v, None, scaling=attn.scale, dropout=0.0)
        return hooked_weights(self.head_hook(layer), weights)


def load_hf(name_or_path: str, device=None, dtype=None, *, attn_implementation: str | None = None,
            revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> HFBackend:
    """Load a transformers dual encoder (hub id or local folder) with its tokenizer and image processor.

    Supported ``model_type``: ``clip``, ``chinese_clip``, ``altclip``, ``metaclip_2`` (:class:`HFBackend`),
    ``siglip`` (:class:`SiglipBackend`), ``siglip2`` (:class:`Siglip2Backend`); a folder holding the two towers
    (:func:`towers_folder`) gives :class:`HFTowersBackend`. Files come from the local folder or cache first
    (``local_files_only=True``), then from the Hub when it can be reached; the process-wide ``huggingface_hub``
    settings are never changed. ``dtype`` (a ``torch.dtype``; ``None``: the checkpoint's), ``attn_implementation``
    (``"sdpa"``, ``"eager"`` ...), ``revision`` and ``cache_dir`` go to ``from_pretrained`` as they are: the weights
    are created in ``dtype`` (no full-precision copy first). Raises :class:`ModelLoadError` (one line) for an
    unknown or vision-only model and for an image processor whose output size is not the model's."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    if towers_folder(name_or_path) is not None:
        vision, text = towers_folder(name_or_path)
        return load_towers(str(vision), str(text), device=device, dtype=dtype, attn_implementation=attn_implementation,
                           revision=revision, cache_dir=cache_dir, name=name_or_path)
    hub = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir).items() if v is not None}
    try:
        config = from_cache_or_hub(AutoConfig.from_pretrained, name_or_path, **hub)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        raise ModelLoadError(_not_found_message(name_or_path, exc)) from None
    families = model_families()
    if config.model_type in VISION_ONLY:
        raise ModelLoadError(f"{name_or_path}: a {config.model_type} checkpoint is an image tower alone (no text "
                             "tower, no projection); pass the whole dual encoder instead (the CLIPModel folder or "
                             "hub id it was taken from, e.g. openai/clip-vit-base-patch32), or a "
                             "CLIPVisionModelWithProjection with its text twin as clipheads.load((vision, text))")
    if config.model_type not in families:
        raise ModelLoadError(f"{name_or_path}: model_type {config.model_type!r} is not supported "
                             f"(supported: {', '.join(families)}; open_clip models: prefix the name with open_clip:)")
    model_cls, backend_cls = families[config.model_type]
    try:
        model = from_cache_or_hub(model_cls.from_pretrained, name_or_path,
                                  **model_load_kwargs(dtype, attn_implementation), **hub)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(_not_found_message(name_or_path, exc)) from None
    tokenizer = image_processor = None
    try:
        # a folder without tokenizer files (e.g. a bare save_pretrained) gets an empty 2-token tokenizer from
        # transformers 5 that maps every word to <unk>: better none, and a clear error if text is encoded
        if _may_have_tokenizer(name_or_path):
            tokenizer = from_cache_or_hub(_tokenizer_class(name_or_path, AutoTokenizer).from_pretrained, name_or_path,
                                          **hub)
    except Exception:  # noqa: BLE001 - a model without tokenizer can still encode images
        tokenizer = None
    try:
        image_processor = from_cache_or_hub(AutoImageProcessor.from_pretrained, name_or_path, **hub)
    except Exception:  # noqa: BLE001 - fall back to CLIP's standard preprocessing at the model's size
        image_processor = None
    _own_storage(model)
    backend = backend_cls(model.eval().to(device=device), name_or_path, tokenizer=tokenizer,
                          image_processor=image_processor)
    _check_processor_size(backend, name_or_path)
    return backend


def model_load_kwargs(dtype=None, attn_implementation: str | None = None) -> dict:
    """``from_pretrained`` keywords for the options given (``dtype``, ``attn_implementation``)."""
    return {k: v for k, v in dict(dtype=dtype, attn_implementation=attn_implementation).items() if v is not None}


def _check_processor_size(backend: HFBackend, name: str) -> None:
    size = backend.image_size
    produced = processor_output_size(backend.image_processor)
    if produced is not None and produced != (size, size):
        raise ModelLoadError(f"{name}: its image processor makes {produced[0]}x{produced[1]} images but the "
                             f"model takes {size}x{size}; fix crop_size/size in preprocessor_config.json")


def model_families() -> dict[str, tuple[type, type[HFBackend]]]:
    """``model_type`` -> (transformers model class, clipheads backend class) of the dual encoders supported."""
    from transformers import AltCLIPModel, ChineseCLIPModel, CLIPModel, MetaClip2Model, Siglip2Model, SiglipModel

    return {"clip": (CLIPModel, HFBackend), "chinese_clip": (ChineseCLIPModel, HFBackend),
            "altclip": (AltCLIPModel, HFBackend), "metaclip_2": (MetaClip2Model, HFBackend),
            "siglip": (SiglipModel, SiglipBackend), "siglip2": (Siglip2Model, Siglip2Backend)}


VISION_ONLY = ("clip_vision_model", "chinese_clip_vision_model", "siglip_vision_model", "siglip2_vision_model",
               "altclip_vision_model", "metaclip_2_vision_model")


def processor_output_size(processor) -> tuple[int, int] | None:
    """``(height, width)`` of the images an HF image processor makes (its crop when it crops, else its fixed
    ``size``); ``None`` when it cannot tell (no processor, or a resize by the shortest edge without a crop)."""
    if processor is None:
        return None
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = crop or getattr(processor, "size", None)
    if size is None:
        return None
    size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def from_cache_or_hub(load, name_or_path: str, **kwargs):
    """``load(name_or_path, local_files_only=True)`` (a local folder or the cache), then from the Hub if that
    fails and the Hub can be reached; the cache miss is raised when it cannot (no waiting through retries)."""
    try:
        return load(name_or_path, local_files_only=True, **kwargs)
    except Exception:
        if Path(name_or_path).exists() or not _hub_reachable():
            raise
    return load(name_or_path, **kwargs)


class SiglipBackend(HFBackend):
    """``transformers`` ``SiglipModel``: no class token; the image embedding is the vision tower's attention-pooling
    head (a learned probe attending over every token, ``vision_model.head``) after ``post_layernorm``.

    The encoder layers are hooked through the same attention interface as CLIP; the pooling head's own
    ``nn.MultiheadAttention`` is not a head of the encoder and is never hooked. ``readout_tokens`` is ``None`` (the
    head reads every token), so the search's read-out shortcut is off. Text is padded to the full length
    (``padding="max_length"``), as SigLIP was trained. ``logit_scale`` is ``exp(logit_scale)``; SigLIP's
    ``logit_bias`` is not part of it.
    """

    @staticmethod
    def _has_readout(model: nn.Module) -> bool:
        return bool(getattr(model.vision_model, "use_head", False))

    def _processor(self):
        if self.image_processor is None:
            from transformers import SiglipImageProcessor

            size = self.image_size
            self.image_processor = SiglipImageProcessor(size={"height": size, "width": size})
        return self.image_processor

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ModelLoadError(f"{self.name}: no tokenizer was found with this model; load it from a folder "
                                 "that has tokenizer files or pass tokenizer= to clipheads.load")
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=self._text_max_length(), return_tensors="pt")
        return {"input_ids": tokens["input_ids"]}

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._vision.embeddings(pixels)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self._vision.head(self._vision.post_layernorm(x))

    @property
    def readout_tokens(self) -> int | None:
        return None

    @property
    def prefix_tokens(self) -> int:
        return 0  # patches only: no class token

    def attention_pool(self):
        from clipheads.models.pooling import siglip_pool

        return siglip_pool(self._vision)


NAFLEX_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


class Siglip2Backend(SiglipBackend):
    """``transformers`` ``Siglip2Model``: SigLIP 2 with NaFlex inputs (patches of images at their own aspect ratio,
    padded to ``max_num_patches``, with ``pixel_attention_mask`` and ``spatial_shapes``).

    Two ways in, both through the library's own ``get_image_features``:

    * **fixed resolution** (every pipeline of clipheads: search, eval, explain): an image is resized to a square of
      ``image_size = isqrt(max_num_patches) * patch_size`` pixels (bilinear), then prepared by the model's own
      ``Siglip2ImageProcessor``; :meth:`preprocess` gives it as ``[3, image_size, image_size]``, and the encoder sees
      its ``n x n`` patches with ``spatial_shapes = (n, n)`` and an all-ones ``pixel_attention_mask``;
    * **NaFlex**: :meth:`encode_image` also takes the processor's output as is (a mapping with ``pixel_values
      [B, N, 3*p*p]``, ``pixel_attention_mask [B, N]``, ``spatial_shapes [B, 2]``; :meth:`preprocess_naflex`
      makes it). Padding patches are masked out of every attention, as the library does; the operators act on the
      heads' outputs at every position and the pooling head never reads the padding.

    A SigLIP 2 checkpoint whose config says ``model_type: siglip`` is a ``SiglipModel`` and loads as
    :class:`SiglipBackend`.
    """

    @property
    def patch_size(self) -> int:
        return int(self._vision.config.patch_size)

    @property
    def image_size(self) -> int:
        patches = getattr(self.image_processor, "max_num_patches", None) or self._vision.config.num_patches
        return math.isqrt(int(patches)) * self.patch_size

    def _processor(self):
        if self.image_processor is None:
            from transformers import Siglip2ImageProcessor

            side = self.image_size // self.patch_size
            self.image_processor = Siglip2ImageProcessor(patch_size=self.patch_size, max_num_patches=side * side)
        return self.image_processor

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        size = self.image_size
        square = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        out = self._processor()(images=square, return_tensors="pt")
        rows, cols = (int(n) for n in out["spatial_shapes"][0])
        patches = out["pixel_values"][0][: rows * cols]  # [rows*cols, p*p*3], channels last within a patch
        p = self.patch_size
        return patches.reshape(rows, cols, p, p, 3).permute(4, 0, 2, 1, 3).reshape(3, rows * p, cols * p)

    def preprocess_naflex(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """PIL images -> the model's own ``Siglip2ImageProcessor`` output (NaFlex: each image at its own aspect
        ratio), a dict of ``pixel_values [B, N, 3*p*p]``, ``pixel_attention_mask [B, N]``, ``spatial_shapes [B, 2]``
        for :meth:`encode_image`."""
        out = self._processor()(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return {k: out[k] for k in NAFLEX_KEYS}

    def naflex_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Square pixels ``[B, 3, H, W]`` (:meth:`preprocess`) -> the NaFlex inputs of the same image: patches
        ``[B, H/p * W/p, 3*p*p]`` as ``Siglip2ImageProcessor`` lays them out, ``spatial_shapes`` ``(H/p, W/p)`` and
        an all-ones ``pixel_attention_mask``."""
        from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

        p = self.patch_size
        batch, _, height, width = pixels.shape
        patches = torch.stack([convert_image_to_patches(im, p) for im in pixels])
        shapes = torch.tensor([[height // p, width // p]], device=pixels.device).expand(batch, 2)
        mask = torch.ones(batch, patches.shape[1], dtype=torch.int32, device=pixels.device)
        return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}

    def encode_image(self, pixels, normalize: bool = False) -> torch.Tensor:
        """As :meth:`CLIPBackend.encode_image`, and NaFlex inputs: a mapping holding ``pixel_values [B, N, 3*p*p]``,
        ``pixel_attention_mask [B, N]`` and ``spatial_shapes [B, 2]`` (the processor's output).

        Raises:
            ClipHeadsError: a mapping without those keys or with patches of another size than the model's."""
        if not isinstance(pixels, Mapping):
            return super().encode_image(pixels, normalize)
        missing = [k for k in NAFLEX_KEYS if k not in pixels]
        if missing:
            raise ClipHeadsError(f"encode_image got a mapping without {', '.join(missing)}; NaFlex inputs are the "
                                 "Siglip2ImageProcessor's output (model.preprocess_naflex(images))")
        inputs = {k: torch.as_tensor(pixels[k]).to(self.device) for k in NAFLEX_KEYS}
        width = 3 * self.patch_size**2
        if inputs["pixel_values"].dim() != 3 or inputs["pixel_values"].shape[-1] != width:
            raise ClipHeadsError(f"encode_image got NaFlex pixel_values of shape {tuple(inputs['pixel_values'].shape)};"
                                 f" {self.name} takes [batch, patches, {width}] (patch size {self.patch_size})")
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        intervention = self.intervention
        calls = getattr(intervention, "calls", 0)
        features = _get_features(self.model.get_image_features(**inputs))
        if intervention is not None and self.hooked_layers and intervention.calls == calls:
            raise ClipHeadsError(f"{self.name}: an ablation is applied but its hooks did not run during "
                                 "encode_image; the model's attention code path is not supported")
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _get_features(self.model.get_image_features(**self.naflex_inputs(pixels)))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        inputs = self.naflex_inputs(pixels)
        return self._vision.embeddings(inputs["pixel_values"], inputs["spatial_shapes"])


class CLIPTowers(nn.Module):
    """A CLIP whose two towers are held apart: ``CLIPVisionModelWithProjection`` (``vision``) and
    ``CLIPTextModelWithProjection`` (``text``), as ``clipheads.load((vision, text))`` takes them.

    It exposes the vision side under ``CLIPModel``'s names (``vision_model``, ``visual_projection``), so the one
    :class:`HFBackend` code hooks it; the towers are the library's own modules, unchanged.
    """

    def __init__(self, vision: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.text = text

    @property
    def vision_model(self) -> nn.Module:
        return self.vision.vision_model

    @property
    def visual_projection(self) -> nn.Linear:
        return self.vision.visual_projection


# logit scale of the towers used apart: they do not carry CLIP's learned one; 100 is the value CLIP trains up to
# (its clamp at log(100)) and OpenAI's checkpoints hold
TOWERS_LOGIT_SCALE = 100.0


class HFTowersBackend(HFBackend):
    """The towers of a ``transformers`` CLIP used apart (:class:`CLIPTowers`): image embeddings are the vision
    tower's ``image_embeds``, text embeddings the text tower's ``text_embeds``. Everything on the image side (hooks,
    stages, search fast path, bake) is :class:`HFBackend`'s. ``logit_scale`` is ``TOWERS_LOGIT_SCALE`` (100; the
    towers do not carry CLIP's)."""

    def _text_positions(self) -> int:
        return int(getattr(self.model.text.config, "max_position_embeddings", 77))

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision(pixel_values=pixels).image_embeds

    def _encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.text(**tokens).text_embeds

    @property
    def logit_scale(self) -> float:
        return TOWERS_LOGIT_SCALE


TOWER_FOLDERS = ("vision", "text")


def towers_folder(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(path/vision, path/text)`` when ``path`` is a folder holding the two towers (each a ``save_pretrained``
    folder, as :func:`clipheads.save` writes a :class:`CLIPTowers`) and no ``config.json`` of its own, else ``None``."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return None
    parts = tuple(folder / name for name in TOWER_FOLDERS)
    return parts if all((part / "config.json").is_file() for part in parts) else None


def load_towers(vision: str | nn.Module, text: str | nn.Module, device=None, dtype=None, *,
                attn_implementation: str | None = None, revision: str | None = None,
                cache_dir: str | os.PathLike | None = None, tokenizer=None, image_processor=None,
                name: str | None = None) -> HFTowersBackend:
    """The two towers of a CLIP used apart -> :class:`HFTowersBackend`.

    ``vision``: a ``CLIPVisionModelWithProjection`` or its folder / hub id; ``text``: a ``CLIPTextModelWithProjection``
    or its folder / hub id (a whole ``CLIPModel`` checkpoint works for both, as in transformers). The tokenizer and
    image processor are read from the text and vision folders unless given. Raises :class:`ModelLoadError` (one line)
    for a tower of another class, or a checkpoint without the projection (a plain ``CLIPVisionModel`` /
    ``CLIPTextModel``: transformers would initialise the projection randomly)."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    hub = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir).items() if v is not None}
    towers = []
    for source, cls, projection in ((vision, CLIPVisionModelWithProjection, "visual_projection"),
                                    (text, CLIPTextModelWithProjection, "text_projection")):
        if isinstance(source, nn.Module):
            if not isinstance(source, cls):
                raise ModelLoadError(f"the {'vision' if cls is CLIPVisionModelWithProjection else 'text'} tower must "
                                     f"be a {cls.__name__}, not a {type(source).__name__}")
            towers.append(source)
            continue
        try:
            model, info = from_cache_or_hub(cls.from_pretrained, str(source), output_loading_info=True,
                                            **model_load_kwargs(dtype, attn_implementation), **hub)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
            raise ModelLoadError(_not_found_message(str(source), exc)) from None
        if any(key.startswith(projection) for key in info.get("missing_keys", ())):
            bare = cls.__name__.removesuffix("WithProjection")
            raise ModelLoadError(f"{source}: the checkpoint has no {projection} (a {bare}); pass a {cls.__name__} "
                                 "checkpoint or the whole CLIPModel it was taken from")
        _own_storage(model)
        towers.append(model)
        if cls is CLIPTextModelWithProjection and tokenizer is None and _may_have_tokenizer(str(source)):
            try:
                tokenizer = from_cache_or_hub(AutoTokenizer.from_pretrained, str(source), **hub)
            except Exception:  # noqa: BLE001 - a model without tokenizer can still encode images
                tokenizer = None
        if cls is CLIPVisionModelWithProjection and image_processor is None:
            try:
                image_processor = from_cache_or_hub(AutoImageProcessor.from_pretrained, str(source), **hub)
            except Exception:  # noqa: BLE001 - CLIP's standard preprocessing at the model's size
                image_processor = None
    model = CLIPTowers(*towers).eval().to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    if name is None:
        name = f"({vision}, {text})" if isinstance(vision, str) and isinstance(text, str) else "CLIPTowers"
    backend = HFTowersBackend(model, name, tokenizer=tokenizer, image_processor=image_processor)
    _check_processor_size(backend, backend.name)
    return backend


def _own_storage(model: nn.Module) -> None:
    """Copy parameters that ``from_pretrained`` left as views into the memory-mapped file into tensors of their own.

    A view at an unaligned offset of the file makes the CPU matrix kernels take another path, so the loaded model
    differed from the model that was saved in the last bits (3.6e-7 on a tiny CLIP); with its own tensors it
    computes bit for bit what the saved model computed.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu" and param.data_ptr() % 64:
                param.data = param.data.clone()



TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")


def _tokenizer_class(name_or_path: str, default):
    """The class that reads a folder's tokenizer as it was saved: a generic ``tokenizers`` one (``tokenizer_class``
    ``TokenizersBackend``/``PreTrainedTokenizerFast``) is read by that class; ``AutoTokenizer`` would pick the model
    type's own class instead (SigLIP 2: the Gemma tokenizer), which reads the same file into another tokenizer."""
    import json

    from transformers import PreTrainedTokenizerFast

    config = Path(name_or_path) / "tokenizer_config.json"
    try:
        saved = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    except (OSError, ValueError):
        saved = None
    return PreTrainedTokenizerFast if saved in ("TokenizersBackend", "PreTrainedTokenizerFast") else default


def _may_have_tokenizer(name_or_path: str) -> bool:
    folder = Path(name_or_path)
    return not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES)


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_found_message(name: str, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(reason) > 160:
        reason = reason[:157] + "..."
    if Path(name).exists():
        return f"cannot load model from {name!r}: {reason}"
    if name.startswith(("/", "./", "../", "~")) or "\\" in name:  # a path, not a Hub id
        return f"model folder {name!r} does not exist"
    return (f"cannot load model {name!r}: it is neither a local folder nor in the Hugging Face cache and the Hub "
            f"is not reachable ({reason}). Provide weights as a local folder (save_pretrained), pre-download them "
            "into the cache (HF_HOME) and set HF_HUB_OFFLINE=1, or use 'bundled' for the model shipped with "
            "clipheads")
