"""What the layer scan calls: ``generate_captions`` for either captioner, ``load_captioner``, CLIP scores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from clipheads.captions.encoder_decoder import VisionEncoderDecoderCaptioner
from clipheads.captions.prefix import CONFIG_FILE, PrefixCaptioner
from clipheads.errors import ClipHeadsError, ModelLoadError

Captioner = PrefixCaptioner | VisionEncoderDecoderCaptioner


def generate_captions(captioner: Captioner, backend, pixels: torch.Tensor,
                      prefixes: str | Sequence[str] | None = None, num_beams: int = 1, max_new_tokens: int = 20,
                      batch_size: int = 64) -> list[str]:
    """One caption per image, each starting with its text prefix; greedy (``num_beams=1``) or beam search.

    Any ``clipheads.ablate`` intervention active on ``backend`` changes the image embedding the captioner reads,
    hence the captions. Deterministic.

    Args:
        captioner: a :class:`PrefixCaptioner` or a :class:`VisionEncoderDecoderCaptioner`.
        backend: the CLIP model whose image embedding drives a prefix captioner; for an encoder-decoder, ``None``
            or ``captioner.backend`` (its own encoder).
        pixels: ``[B, 3, H, W]`` preprocessed images.
        prefixes: ``None``, one text prefix for all images ("a photo of a"), or one per image.
        num_beams: 1 for greedy decoding, more for beam search.
        max_new_tokens: most tokens generated after the prefix.
        batch_size: images per forward pass.

    Returns:
        ``B`` captions.
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ClipHeadsError(f"num_beams and max_new_tokens must be >= 1 (got {num_beams}, {max_new_tokens})")
    if isinstance(captioner, PrefixCaptioner) and backend is None:
        raise ClipHeadsError("a prefix captioner needs the CLIP model (backend) whose image embeddings it reads")
    if not isinstance(captioner, PrefixCaptioner | VisionEncoderDecoderCaptioner):
        raise ClipHeadsError(f"not a captioner: {type(captioner).__name__}")
    if pixels.ndim != 4:
        raise ClipHeadsError(f"pixels must be [batch, 3, height, width], got shape {list(pixels.shape)}")
    texts: list[str | None] = [None] * len(pixels) if prefixes is None else (
        [prefixes] * len(pixels) if isinstance(prefixes, str) else list(prefixes))
    if len(texts) != len(pixels):
        raise ClipHeadsError(f"got {len(texts)} text prefixes for {len(pixels)} images")
    captions: list[str] = []
    for start in range(0, len(pixels), batch_size):
        stop = start + batch_size
        captions += captioner.generate(backend, pixels[start:stop], texts[start:stop], num_beams=num_beams,
                                       max_new_tokens=max_new_tokens)
    return captions


def load_captioner(folder: str | Path, device: str | torch.device | None = None) -> Captioner:
    """Load a prefix captioner (``captioner.json``) or a Hugging Face ``VisionEncoderDecoderModel`` folder.

    Raises:
        DeviceError: ``device`` is not a device of this machine (checked before loading).
        ModelLoadError: the folder holds neither kind of captioner.
    """
    from clipheads.models.device import check_device

    check_device(device)
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return PrefixCaptioner.load(folder, device=device)
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {str(config)!r}: {exc}") from None
        if model_type == "vision-encoder-decoder":
            return VisionEncoderDecoderCaptioner.load(folder, device=device)
    raise ModelLoadError(f"{str(folder)!r} is neither a clipheads captioner (captioner.json) nor a Hugging Face "
                         "VisionEncoderDecoderModel folder")


@torch.no_grad()
def clip_scores(backend, pixels_or_features: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """CLIPScore of each (image, caption) pair: ``100 * max(cos, 0)``, shape ``[B]``.

    Args:
        backend: the CLIP model that scores (with any active ablation, if pixels are given).
        pixels_or_features: ``[B, 3, H, W]`` pixels, or ``[B, D]`` image embeddings already computed.
        captions: ``B`` captions.
    """
    if len(captions) != len(pixels_or_features):
        raise ClipHeadsError(f"got {len(captions)} captions for {len(pixels_or_features)} images")
    images = pixels_or_features if pixels_or_features.ndim == 2 else backend.encode_image(pixels_or_features)
    images = torch.nn.functional.normalize(images.float(), dim=-1)
    texts = backend.encode_text(list(captions), normalize=True).float().to(images.device)
    return 100 * (images * texts).sum(-1).clamp(min=0)
