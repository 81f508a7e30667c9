"""Hugging Face ``transformers`` backends: ``CLIPModel``, ``ChineseCLIPModel`` and ``SiglipModel``.

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
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import nn
from transformers import AttentionInterface
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


def _get_features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFBackend(CLIPBackend):
    """``transformers`` CLIP (``CLIPModel``) or Chinese-CLIP (``ChineseCLIPModel``)."""

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
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return dict(tokens)

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
        block = self._layers[layer]
        attn = block.self_attn
        h = block.layer_norm1(x)
        shape = (x.shape[0], -1, attn.num_heads, attn.head_dim)
        q = attn.q_proj(h if queries is None else h[:, :queries]).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        z = nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        return z.transpose(1, 2), v.transpose(1, 2)

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

    def attention_weights(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self._layers[layer]
        attn = block.self_attn
        h = block.layer_norm1(x)
        shape = (*h.shape[:-1], -1, attn.head_dim)
        q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        _, weights = _eager_function(attn)(attn, q, k, v, None, scaling=attn.scale, dropout=0.0)
        return hooked_weights(self.head_hook(layer), weights)


def load_hf(name_or_path: str, device=None, dtype=None) -> HFBackend:
    """Load a ``CLIPModel``/``ChineseCLIPModel`` (hub id or local folder) with its tokenizer and processor.

    Files come from the local folder or cache first (``local_files_only=True``), then from the Hub when it can be
    reached; the process-wide ``huggingface_hub`` settings are never changed. Raises :class:`ModelLoadError` (one
    line) for an unknown or vision-only model and for an image processor whose output size is not the model's."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, ChineseCLIPModel, CLIPModel, SiglipModel

    try:
        config = from_cache_or_hub(AutoConfig.from_pretrained, name_or_path)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        raise ModelLoadError(_not_found_message(name_or_path, exc)) from None
    classes = {"clip": CLIPModel, "chinese_clip": ChineseCLIPModel, "siglip": SiglipModel}
    model_cls = classes.get(config.model_type)
    if config.model_type in VISION_ONLY:
        raise ModelLoadError(f"{name_or_path}: a {config.model_type} checkpoint is an image tower alone (no text "
                             "tower, no projection); pass the whole dual encoder instead (the CLIPModel folder or "
                             "hub id it was taken from, e.g. openai/clip-vit-base-patch32)")
    if model_cls is None:
        raise ModelLoadError(f"{name_or_path}: model_type {config.model_type!r} is not supported "
                             f"(supported: {', '.join(classes)}; open_clip models: prefix the name with open_clip:)")
    try:
        model = from_cache_or_hub(model_cls.from_pretrained, name_or_path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(_not_found_message(name_or_path, exc)) from None
    tokenizer = image_processor = None
    try:
        # a folder without tokenizer files (e.g. a bare save_pretrained) gets an empty 2-token tokenizer from
        # transformers 5 that maps every word to <unk>: better none, and a clear error if text is encoded
        if _may_have_tokenizer(name_or_path):
            tokenizer = from_cache_or_hub(AutoTokenizer.from_pretrained, name_or_path)
    except Exception:  # noqa: BLE001 - a model without tokenizer can still encode images
        tokenizer = None
    try:
        image_processor = from_cache_or_hub(AutoImageProcessor.from_pretrained, name_or_path)
    except Exception:  # noqa: BLE001 - fall back to CLIP's standard preprocessing at the model's size
        image_processor = None
    _own_storage(model)
    size = int(model.config.vision_config.image_size)
    produced = processor_output_size(image_processor)
    if produced is not None and produced != (size, size):
        raise ModelLoadError(f"{name_or_path}: its image processor makes {produced[0]}x{produced[1]} images but the "
                             f"model takes {size}x{size}; fix crop_size/size in preprocessor_config.json")
    model.eval().to(device=device, dtype=dtype)
    backend_cls = SiglipBackend if config.model_type == "siglip" else HFBackend
    return backend_cls(model, name_or_path, tokenizer=tokenizer, image_processor=image_processor)


VISION_ONLY = ("clip_vision_model", "chinese_clip_vision_model", "siglip_vision_model")


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
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"]}

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._vision.embeddings(pixels)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self._vision.head(self._vision.post_layernorm(x))

    @property
    def readout_tokens(self) -> int | None:
        return None


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
