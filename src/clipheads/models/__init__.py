"""Model loading: one entry point, ``load``, over the ``transformers`` and ``open_clip`` backends."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from clipheads.errors import ModelLoadError
from clipheads.models.base import Architecture, CLIPBackend, HeadHook
from clipheads.models.device import check_device
from clipheads.models.hf import (
    VISION_ONLY,
    CLIPTowers,
    HFBackend,
    HFTowersBackend,
    Siglip2Backend,
    SiglipBackend,
    load_hf,
)
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


LOAD_OPTIONS = ("attn_implementation", "revision", "cache_dir")
_LOAD_DEFAULTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("clipheads_load_options", default=None)


@contextmanager
def load_options(attn_implementation: str | None = None, revision: str | None = None,
                 cache_dir: str | Path | None = None, pretrained: str | None = None) -> Iterator[dict]:
    """Inside, :func:`load` of a model by name or folder takes these options where its call does not give them (the
    CLI's ``--attn-implementation``, ``--revision``, ``--model-cache-dir`` and ``--pretrained`` reach every load of a
    command this way)."""
    given = {k: v for k, v in dict(attn_implementation=attn_implementation, revision=revision,
                                   cache_dir=cache_dir, pretrained=pretrained).items() if v is not None}
    token = _LOAD_DEFAULTS.set(given)
    try:
        yield given
    finally:
        _LOAD_DEFAULTS.reset(token)


def current_load_options() -> dict:
    """The options of the :func:`load_options` block running now (``{}`` outside one)."""
    return dict(_LOAD_DEFAULTS.get() or {})


def load(name_or_path: str | Path | nn.Module | CLIPBackend | tuple = BUNDLED, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, pretrained: str | None = None, tokenizer=None,
         preprocess=None, attn_implementation: str | None = None, revision: str | None = None,
         cache_dir: str | Path | None = None, precision: str | None = None,
         force_image_size: int | tuple[int, int] | None = None, force_quick_gelu: bool = False) -> CLIPBackend:
    """Load a CLIP model and return its backend.

    Args:
        name_or_path: ``"bundled"`` (default, the model shipped with clipheads); a Hugging Face hub id or local
            folder (``CLIPModel``/``ChineseCLIPModel``/``SiglipModel``; a folder written by :func:`clipheads.save`,
            either backend); ``"open_clip:ARCH"`` (random init),
            ``"open_clip:ARCH/TAG"`` (pretrained tag), ``"open_clip:ARCH/path/to/ckpt.pt"``,
            ``"open_clip:hf-hub:org/repo"``, also spelled ``"hf-hub:org/repo"`` and ``"open-clip:org/repo"``
            (ViT-Prisma); a bare open_clip architecture (``"ViT-B-32"``, clip_benchmark's ``--model``); or an already
            built library model, which is wrapped as is. Also ``AltCLIPModel``, ``MetaClip2Model``, ``SiglipModel``
            and ``Siglip2Model`` folders/ids. A CLIP's towers used apart: ``(vision, text)``, a
            ``CLIPVisionModelWithProjection`` and a ``CLIPTextModelWithProjection`` (models, or their folders / hub
            ids), or a folder holding them as ``vision/`` and ``text/`` (what :func:`clipheads.save` writes for them).
        device: where to put the model (default: where it is, CPU for new loads).
        dtype: ``torch.dtype``, ``"fp32"``/``"fp16"``/``"bf16"``, or an open_clip precision name (``"amp_bf16"``,
            ``"pure_fp16"`` ..., :mod:`clipheads.precision`): the dtype it holds the weights in (an autocast is the
            caller's: ``parse_precision(name).autocast(device)``).
        pretrained: an open_clip pretrained tag or checkpoint file (clip_benchmark's ``--pretrained``).
        tokenizer, preprocess: for an already built model, its text tokenizer and image transform (transformers: a
            tokenizer and an image processor; open_clip: ``open_clip.get_tokenizer(config)`` and the transform of
            ``create_model_and_transforms``). Without them an open_clip model uses its own preprocessing config
            and CLIP's BPE only if its text tower has CLIP's vocabulary, else refuses in one line when used.
        attn_implementation, revision, cache_dir: transformers' ``from_pretrained`` options, passed as they are
            (``attn_implementation``: ``"sdpa"``, ``"eager"`` ...; ``dtype`` is passed too, so the weights are created
            in it). open_clip takes ``cache_dir`` only.
        precision, force_image_size, force_quick_gelu: open_clip's ``create_model_and_transforms`` options, passed as
            they are (``precision``: ``fp32``, ``fp16``, ``bf16``, ``pure_fp16``, ``pure_bf16`` ...).

    Raises:
        DeviceError: ``device`` is not a torch device or this machine does not have it (checked before loading).
        ModelLoadError: the model cannot be found or loaded; an option of one library given for the other's model.
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
    defaults = _LOAD_DEFAULTS.get() or {}
    if defaults and isinstance(name_or_path, str | Path | tuple | list) and not (
            isinstance(name_or_path, tuple | list) and any(isinstance(m, nn.Module) for m in name_or_path)):
        attn_implementation = attn_implementation or defaults.get("attn_implementation")
        revision = revision or defaults.get("revision")
        cache_dir = cache_dir or defaults.get("cache_dir")
        pretrained = pretrained or defaults.get("pretrained")
    hf_options = dict(attn_implementation=attn_implementation, revision=revision, cache_dir=cache_dir)
    open_clip_options = dict(precision=precision, force_image_size=force_image_size,
                             force_quick_gelu=force_quick_gelu or None)
    if isinstance(name_or_path, CLIPBackend | nn.Module) or (isinstance(name_or_path, tuple | list)
                                                            and all(isinstance(m, nn.Module) for m in name_or_path)):
        given = [k for k, v in {**hf_options, **open_clip_options}.items() if v is not None]
        if given:
            raise ModelLoadError(f"{', '.join(given)} are loading options; this model is already built (give them "
                                 "to the library's from_pretrained / create_model_and_transforms)")
    if isinstance(name_or_path, CLIPBackend):
        return name_or_path.to(device, dtype)
    if isinstance(name_or_path, nn.Module):
        return as_backend(name_or_path, tokenizer=tokenizer, preprocess=preprocess).to(device, dtype)
    if isinstance(name_or_path, tuple | list):
        if len(name_or_path) != 2:
            raise ModelLoadError(f"a model given as a tuple is (vision, text): two towers, not {len(name_or_path)}")
        from clipheads.models.hf import load_towers

        vision, text = (m if isinstance(m, nn.Module) else str(m) for m in name_or_path)
        return load_towers(vision, text, device=device, dtype=dtype, tokenizer=tokenizer, image_processor=preprocess,
                           attn_implementation=attn_implementation, revision=revision, cache_dir=cache_dir)
    name = str(name_or_path)
    if name == BUNDLED:
        given = [f"{k}={v!r}" for k, v in dict(pretrained=pretrained, revision=revision).items() if v]
        if given:
            raise ModelLoadError(f"{', '.join(given)}: the bundled model has no pretrained tags or revisions; name the "
                                 "model these are for with --model (e.g. --model ViT-B-32 --pretrained "
                                 "laion2b_s34b_b79k)")
        path = bundled_model_path()
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the bundled model is missing from {path}; reinstall clipheads or run "
                                 "`clipheads world train` to rebuild it")
        with _no_transformers_progress_bar():  # a 6 MB local model: a "Loading weights" bar is only noise
            _refuse_options(name, "open_clip", **open_clip_options)
            backend = load_hf(str(path), device=device, dtype=dtype, attn_implementation=attn_implementation)
        backend.name = BUNDLED
        return backend
    name = open_clip_name(name, pretrained)
    if name.startswith(OPEN_CLIP_PREFIX):
        _refuse_options(name, "transformers", attn_implementation=attn_implementation, revision=revision)
        return load_open_clip(name, device=device, dtype=dtype, pretrained=pretrained, cache_dir=cache_dir,
                              **open_clip_options)
    if pretrained:
        raise ModelLoadError(f"pretrained={pretrained!r} is for open_clip models, but {name!r} is not one "
                             "(spell it open_clip:ARCH)")
    if (Path(name) / OPEN_CLIP_CONFIG).is_file() and not (Path(name) / "config.json").is_file():
        _refuse_options(name, "transformers", attn_implementation=attn_implementation, revision=revision)
        return load_open_clip(f"{OPEN_CLIP_PREFIX}local-dir:{name}", device=device, dtype=dtype,  # clipheads.save
                              cache_dir=cache_dir, **open_clip_options)
    _refuse_options(name, "open_clip", **open_clip_options)
    return load_hf(name, device=device, dtype=dtype, **hf_options)


def _refuse_options(name: str, library: str, **options) -> None:
    """One line naming the options of ``library`` given for a model of the other library."""
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise ModelLoadError(f"{', '.join(given)}: {library}'s loading option(s), but {name!r} is not a {library} "
                             "model")


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
    """Wrap a library model (``CLIPModel``, ``ChineseCLIPModel``, ``AltCLIPModel``, ``MetaClip2Model``, ``SiglipModel``,
    ``Siglip2Model``, :class:`CLIPTowers` or an open_clip ``CLIP``) in its backend (with its ``tokenizer`` and image
    ``preprocess``, see :func:`load`)."""
    if isinstance(model, CLIPBackend):
        return model
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in VISION_ONLY or (model_type not in ("siglip", "siglip2") and hasattr(model, "vision_model")
                                     and not hasattr(model, "visual_projection")):
        raise ModelLoadError(f"{type(model).__name__} is an image tower alone (no text tower, no projection); pass "
                             "the whole dual encoder (e.g. CLIPModel.from_pretrained(...)) it was taken from, or a "
                             "CLIPVisionModelWithProjection with its text twin as clipheads.load((vision, text))")
    if isinstance(model, CLIPTowers):
        backend: CLIPBackend = HFTowersBackend(model, name or "CLIPTowers", tokenizer=tokenizer,
                                               image_processor=preprocess)
    elif model_type in ("siglip", "siglip2"):
        cls = Siglip2Backend if model_type == "siglip2" else SiglipBackend
        backend = cls(model, name or type(model).__name__, tokenizer=tokenizer, image_processor=preprocess)
    elif hasattr(model, "vision_model"):
        backend = HFBackend(model, name or type(model).__name__, tokenizer=tokenizer,
                                         image_processor=preprocess)
    elif hasattr(model, "visual"):
        backend = open_clip_backend(model, name or OPEN_CLIP_PREFIX + type(model).__name__, preprocess=preprocess,
                                    tokenizer=tokenizer)
    else:
        raise ModelLoadError(f"{type(model).__name__} is neither a transformers CLIP model nor an open_clip model")
    return backend


__all__ = ["Architecture", "BUNDLED", "CLIPBackend", "CLIPTowers", "HFBackend", "HFTowersBackend", "HeadHook",
           "OpenCLIPBackend", "OpenCLIPTimmBackend", "Siglip2Backend", "SiglipBackend",
           "as_backend", "bundled_model_path", "check_device", "load", "load_options", "parse_dtype", "save"]
