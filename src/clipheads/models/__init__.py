"""Model loading: one entry point, ``load``, over the ``transformers`` and ``open_clip`` backends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from clipheads.errors import ModelLoadError
from clipheads.models.base import Architecture, CLIPBackend, HeadHook
from clipheads.models.device import check_device
from clipheads.models.hf import VISION_ONLY, HFBackend, SiglipBackend, load_hf
from clipheads.models.openclip import PREFIX as OPEN_CLIP_PREFIX
from clipheads.models.openclip import OpenCLIPBackend, load_open_clip, open_clip_backend
from clipheads.models.openclip_timm import OpenCLIPTimmBackend
from clipheads.models.saving import OPEN_CLIP_CONFIG, save

BUNDLED = "bundled"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def bundled_model_path() -> Path:
    """Folder of the small CLIP that ships inside the package (trained on the bundled world)."""
    return Path(__file__).resolve().parent.parent / "assets" / "bundled"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load(name_or_path: str | Path | nn.Module | CLIPBackend = BUNDLED, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, pretrained: str | None = None, tokenizer=None,
         preprocess=None) -> CLIPBackend:
    """Load a CLIP model and return its backend.

    Args:
        name_or_path: ``"bundled"`` (default, the model shipped with clipheads); a Hugging Face hub id or local
            folder (``CLIPModel``/``ChineseCLIPModel``/``SiglipModel``; a folder written by :func:`clipheads.save`,
            either backend); ``"open_clip:ARCH"`` (random init),
            ``"open_clip:ARCH/TAG"`` (pretrained tag), ``"open_clip:ARCH/path/to/ckpt.pt"``,
            ``"open_clip:hf-hub:org/repo"``, also spelled ``"hf-hub:org/repo"`` and ``"open-clip:org/repo"``
            (ViT-Prisma); a bare open_clip architecture (``"ViT-B-32"``, clip_benchmark's ``--model``); or an already
            built library model, which is wrapped as is.
        device: where to put the model (default: where it is, CPU for new loads).
        dtype: ``torch.dtype``, ``"fp32"``/``"fp16"``/``"bf16"``, or an open_clip precision name (``"amp_bf16"``,
            ``"pure_fp16"`` ..., :mod:`clipheads.precision`): the dtype it holds the weights in (an autocast is the
            caller's: ``parse_precision(name).autocast(device)``).
        pretrained: an open_clip pretrained tag or checkpoint file (clip_benchmark's ``--pretrained``).
        tokenizer, preprocess: for an already built model, its text tokenizer and image transform (transformers: a
            tokenizer and an image processor; open_clip: ``open_clip.get_tokenizer(config)`` and the transform of
            ``create_model_and_transforms``). Without them an open_clip model uses its own preprocessing config
            and CLIP's BPE only if its text tower has CLIP's vocabulary, else refuses in one line when used.

    Raises:
        DeviceError: ``device`` is not a torch device or this machine does not have it (checked before loading).
        ModelLoadError: the model cannot be found or loaded.
    """
    if isinstance(dtype, str) and dtype not in _DTYPES:
        from clipheads.errors import ClipHeadsError
        from clipheads.precision import parse_precision

        try:
            dtype = parse_precision(dtype).weights
        except ClipHeadsError:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or an open_clip precision "
                                 "(amp, amp_bf16, pure_fp16, pure_bf16)") from None
    dtype = parse_dtype(dtype)
    check_device(device)
    if isinstance(name_or_path, CLIPBackend):
        return name_or_path.to(device, dtype)
    if isinstance(name_or_path, nn.Module):
        return as_backend(name_or_path, tokenizer=tokenizer, preprocess=preprocess).to(device, dtype)
    name = str(name_or_path)
    if name == BUNDLED:
        path = bundled_model_path()
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the bundled model is missing from {path}; reinstall clipheads or run "
                                 "`clipheads world train` to rebuild it")
        with _no_transformers_progress_bar():  # a 6 MB local model: a "Loading weights" bar is only noise
            backend = load_hf(str(path), device=device, dtype=dtype)
        backend.name = BUNDLED
        return backend
    name = open_clip_name(name, pretrained)
    if name.startswith(OPEN_CLIP_PREFIX):
        return load_open_clip(name, device=device, dtype=dtype, pretrained=pretrained)
    if pretrained:
        raise ModelLoadError(f"pretrained={pretrained!r} is for open_clip models, but {name!r} is not one "
                             "(spell it open_clip:ARCH)")
    if (Path(name) / OPEN_CLIP_CONFIG).is_file() and not (Path(name) / "config.json").is_file():
        return load_open_clip(f"{OPEN_CLIP_PREFIX}local-dir:{name}", device=device, dtype=dtype)  # clipheads.save
    return load_hf(name, device=device, dtype=dtype)


@contextmanager
def _no_transformers_progress_bar() -> Iterator[None]:
    """Hide transformers' tqdm bars while inside; the previous setting is restored on exit."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def open_clip_name(name: str, pretrained: str | None = None) -> str:
    """The ``open_clip:`` spelling of the names users copy: ``hf-hub:org/repo`` (open_clip) and ``open-clip:org/repo``
    (ViT-Prisma) -> ``open_clip:hf-hub:org/repo``; a bare open_clip architecture that is no local folder (``ViT-B-32``,
    as clip_benchmark's ``--model``) -> ``open_clip:ViT-B-32``. Other names are returned unchanged."""
    if name.startswith("hf-hub:"):
        return OPEN_CLIP_PREFIX + name
    if name.startswith("open-clip:"):
        return OPEN_CLIP_PREFIX + "hf-hub:" + name[len("open-clip:"):]
    if name.startswith(OPEN_CLIP_PREFIX) or "/" in name or Path(name).exists():
        return name
    import open_clip

    from clipheads.models.random_init import register_open_clip_configs

    register_open_clip_configs()
    return OPEN_CLIP_PREFIX + name if name in open_clip.list_models() else name


def as_backend(model: nn.Module | CLIPBackend, name: str | None = None, *, tokenizer=None, preprocess=None
               ) -> CLIPBackend:
    """Wrap a library model (``CLIPModel``, ``ChineseCLIPModel`` or an open_clip ``CLIP``) in its backend (with its
    ``tokenizer`` and image ``preprocess``, see :func:`load`)."""
    if isinstance(model, CLIPBackend):
        return model
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in VISION_ONLY or (model_type != "siglip" and hasattr(model, "vision_model")
                                     and not hasattr(model, "visual_projection")):
        raise ModelLoadError(f"{type(model).__name__} is an image tower alone (no text tower, no projection); pass "
                             "the whole dual encoder (e.g. CLIPModel.from_pretrained(...)) it was taken from")
    if model_type == "siglip":
        backend: CLIPBackend = SiglipBackend(model, name or type(model).__name__, tokenizer=tokenizer,
                                             image_processor=preprocess)
    elif hasattr(model, "vision_model"):
        backend = HFBackend(model, name or type(model).__name__, tokenizer=tokenizer,
                                         image_processor=preprocess)
    elif hasattr(model, "visual"):
        backend = open_clip_backend(model, name or OPEN_CLIP_PREFIX + type(model).__name__, preprocess=preprocess,
                                    tokenizer=tokenizer)
    else:
        raise ModelLoadError(f"{type(model).__name__} is neither a transformers CLIP model nor an open_clip model")
    return backend


__all__ = ["Architecture", "BUNDLED", "CLIPBackend", "HFBackend", "HeadHook", "OpenCLIPBackend", "SiglipBackend",
           "as_backend", "bundled_model_path", "check_device", "load", "parse_dtype", "save",
           "OpenCLIPTimmBackend"]
