"""Captioning with a Hugging Face ``VisionEncoderDecoderModel`` whose encoder is a CLIP vision tower.

The encoder is exposed as a clipheads backend (``captioner.backend``), so ``clipheads.ablate(captioner.backend,
mask)`` ablates heads of the tower the decoder cross-attends to, and the captions show the effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from clipheads.captions.decoding import (
    groups_by_length,
    join_caption,
    normalize_prefixes,
    prefix_token_ids,
    until_eos,
)
from clipheads.errors import ClipHeadsError, ModelLoadError
from clipheads.models.hf import HFBackend


class _VisionTower(nn.Module):
    """A ``CLIPVisionModel`` seen as the image half of a CLIP model (no projection), so ``HFBackend`` can wrap it.

    The image embedding is the tower's pooled output (post-layernorm class token).
    """

    def __init__(self, vision_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = nn.Identity()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).pooler_output


def _share_encoder_config(encoder: nn.Module) -> None:
    """Point the encoder's sub-modules at the encoder's own config object.

    ``VisionEncoderDecoderModel.__init__`` replaces ``encoder.config`` with the shared ``config.encoder`` while the
    layers keep the config they were built with, so switching the tower's attention implementation (what a head
    hook does) would never reach the attention layers.
    """
    for module in encoder.modules():
        if module is not encoder and type(getattr(module, "config", None)) is type(encoder.config):
            module.config = encoder.config


class VisionEncoderDecoderCaptioner:
    """A ``VisionEncoderDecoderModel`` (CLIP vision encoder) with its tokenizer, decoding with ``generate``.

    Args:
        model: the encoder-decoder; its encoder must be a ``CLIPVisionModel``.
        tokenizer: the decoder's tokenizer.
        image_processor: optional, to preprocess PIL images (``backend.preprocess`` falls back to CLIP's own).
    """

    def __init__(self, model: nn.Module, tokenizer, image_processor=None, name: str = "") -> None:
        encoder = getattr(model, "encoder", None)
        if encoder is None or not hasattr(encoder, "embeddings") or not hasattr(encoder, "post_layernorm") \
                or not hasattr(getattr(encoder, "encoder", None), "layers"):
            raise ModelLoadError(f"{name or type(model).__name__}: the encoder ({type(encoder).__name__}) is not a "
                                 "CLIP vision tower (CLIPVisionModel)")
        _share_encoder_config(encoder)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.backend = HFBackend(_VisionTower(encoder), name or "vision-encoder-decoder",
                                 image_processor=image_processor)
        config = model.generation_config
        self.start_id = _first(config.decoder_start_token_id, model.config.decoder_start_token_id,
                               tokenizer.bos_token_id, tokenizer.eos_token_id)
        self.eos_id = _first(config.eos_token_id, tokenizer.eos_token_id)
        self.pad_id = _first(config.pad_token_id, tokenizer.pad_token_id, self.eos_id)
        if self.start_id is None:
            raise ModelLoadError(f"{self.backend.name}: no decoder_start_token_id (set model.config."
                                 "decoder_start_token_id)")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def uses(self, backend) -> bool:
        """Whether ``backend`` wraps this model's own vision encoder (the one the decoder reads)."""
        return backend is self.backend or getattr(getattr(backend, "model", None), "vision_model", None) \
            is self.model.encoder

    @torch.no_grad()
    def generate(self, backend=None, pixels: torch.Tensor | None = None,
                 prefixes: str | Sequence[str] | None = None, num_beams: int = 1,
                 max_new_tokens: int = 20) -> list[str]:
        """Captions of ``[B, 3, H, W]`` images through the model's own encoder (with any active ablation).

        ``backend`` must be ``None`` or ``self.backend``: the decoder was trained on this encoder only.
        """
        if backend is not None and not self.uses(backend):
            raise ClipHeadsError(f"this VisionEncoderDecoderModel reads its own CLIP encoder; pass captioner.backend "
                                 f"(and ablate that one), not {getattr(backend, 'name', type(backend).__name__)!r}")
        if pixels is None:
            raise ClipHeadsError("no images (pixels) to caption")
        texts = normalize_prefixes(prefixes, pixels.shape[0])
        prefix_ids = prefix_token_ids(self.tokenizer, texts)
        pixels = pixels.to(self.device, next(self.model.encoder.parameters()).dtype)
        captions = [""] * len(texts)
        for group in groups_by_length(prefix_ids):
            start = torch.tensor([[self.start_id, *prefix_ids[i]] for i in group], device=self.device)
            generated = self.model.generate(pixel_values=pixels[group], decoder_input_ids=start, do_sample=False,
                                            num_beams=num_beams, max_new_tokens=max_new_tokens,
                                            eos_token_id=self.eos_id, pad_token_id=self.pad_id)
            # encoder-decoder generate returns the decoder inputs followed by the new tokens
            for row, i in zip(generated[:, start.shape[1]:], group, strict=True):
                captions[i] = join_caption(self.tokenizer, texts[i], prefix_ids[i], until_eos(row, self.eos_id))
        return captions

    def save(self, folder: str | Path) -> Path:
        """``save_pretrained`` of the model, its tokenizer and (if any) its image processor."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        if self.backend.image_processor is not None:
            self.backend.image_processor.save_pretrained(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device | None = None) -> VisionEncoderDecoderCaptioner:
        """``from_pretrained`` of a folder written by :meth:`save` (or any such Hugging Face folder)."""
        from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

        try:
            model = VisionEncoderDecoderModel.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load a VisionEncoderDecoderModel from {str(folder)!r}: {reason}") from None
        try:
            image_processor = AutoImageProcessor.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - CLIP's standard preprocessing at the model's size is the fallback
            image_processor = None
        model.to(device or "cpu")
        return cls(model, tokenizer, image_processor=image_processor, name=str(folder))


def _first(*values):
    for value in values:
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def random_vision_encoder_decoder(tokenizer, image_size: int = 32, patch_size: int = 8, width: int = 32,
                                  n_layers: int = 2, n_heads: int = 4, decoder_layers: int = 1,
                                  seed: int = 0) -> VisionEncoderDecoderCaptioner:
    """A tiny randomly initialised CLIP-vision + GPT-2 ``VisionEncoderDecoderModel``, built offline (tests, demos)."""
    from transformers import CLIPVisionConfig, GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder = CLIPVisionConfig(hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               intermediate_size=2 * width, patch_size=patch_size, image_size=image_size)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=width, n_layer=decoder_layers,
                         n_head=n_heads, bos_token_id=start, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                         is_decoder=True, add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = start, pad, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id = start
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return VisionEncoderDecoderCaptioner(model, tokenizer, name="random-vision-encoder-decoder")
