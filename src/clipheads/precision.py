"""One meaning of ``precision`` for every command and the Python API: open_clip's.

open_clip names a run's numerics with one word (``--precision`` of ``open_clip_train``, ``precision=`` of
``open_clip.create_model``): how the weights are held, whether the forward runs under ``torch.autocast`` and in which
dtype the inputs are given. clipheads reads the same words with the same meaning:

============  =========  ========  =====  ===================================================================
name          weights    autocast  input  open_clip source
============  =========  ========  =====  ===================================================================
fp32          float32    no        fp32   (the default)
amp           float32    float16   fp32   ``open_clip_train.precision.get_autocast``
amp_bf16      float32    bfloat16  fp32   ``get_autocast`` (also spelled ``amp_bfloat16``)
fp16          float16    no        fp16   ``factory._set_model_device_and_precision``, ``model.get_input_dtype``
bf16          bfloat16   no        bf16   as fp16
pure_fp16     float16    no        fp16   as fp16
pure_bf16     bfloat16   no        bf16   as fp16
============  =========  ========  =====  ===================================================================

One difference: open_clip's ``fp16``/``bf16`` keep the LayerNorms of its own towers in float32 (``LayerNormFp32``),
which needs the model built for it; clipheads wraps models as they are loaded, so it holds every weight in the low
dtype for both ``fp16`` and ``pure_fp16`` (and for both bf16 spellings). Before this module, ``clipheads eval
--precision bf16`` meant bf16 autocast: that is ``amp_bf16`` now (``fp16`` autocast: ``amp``).

Use :func:`parse_precision` to read a name, :meth:`Precision.autocast` around the model's forward, and
:func:`use_precision` to do both for a whole command (results files then record it: :func:`current_precision`,
:func:`clipheads.runtime.run_meta`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from clipheads.errors import ClipHeadsError


@dataclass(frozen=True)
class Precision:
    """A precision: ``weights`` (the dtype the parameters are held in), ``autocast`` (the dtype of
    ``torch.autocast`` around the forward, ``None``: none) and ``input`` (the dtype of pixels fed to the model,
    ``None``: float32, as ``open_clip.model.get_input_dtype``)."""

    name: str
    weights: torch.dtype
    autocast_dtype: torch.dtype | None
    input: torch.dtype | None

    def autocast(self, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
        """``torch.autocast(device type, dtype)`` for ``amp``/``amp_bf16``, else a context that does nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

    def to_dict(self) -> dict:
        """JSON form for results files: ``{"name": "amp_bf16", "weights": "float32", "autocast": "bfloat16",
        "input": "float32"}``."""
        def short(dtype: torch.dtype | None) -> str | None:
            return None if dtype is None else str(dtype).removeprefix("torch.")

        return {"name": self.name, "weights": short(self.weights), "autocast": short(self.autocast_dtype),
                "input": short(self.input or torch.float32)}


_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", _F32, None, None),
    Precision("amp", _F32, _F16, None),
    Precision("amp_bf16", _F32, _BF16, None),
    Precision("fp16", _F16, None, _F16),
    Precision("bf16", _BF16, None, _BF16),
    Precision("pure_fp16", _F16, None, _F16),
    Precision("pure_bf16", _BF16, None, _BF16),
)}
ALIASES = {"amp_bfloat16": "amp_bf16"}  # open_clip_train accepts both spellings
NAMES = (*PRECISIONS, *ALIASES)


def parse_precision(value: str | Precision | None) -> Precision:
    """The :class:`Precision` named ``value`` (open_clip's names, see the module; ``None``: ``fp32``).

    Raises:
        ClipHeadsError: an unknown name (one line listing the known ones).
    """
    if isinstance(value, Precision):
        return value
    name = "fp32" if value is None else str(value).strip().lower()
    name = ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ClipHeadsError(f"unknown precision {value!r}; use one of {', '.join(NAMES)} (open_clip's names)")
    return PRECISIONS[name]


_CURRENT: contextvars.ContextVar[Precision | None] = contextvars.ContextVar("clipheads_precision", default=None)


def current_precision() -> Precision | None:
    """The precision of the command running now (:func:`use_precision`), ``None`` outside one."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_precision(precision: str | Precision | None, device: str | torch.device = "cpu") -> Iterator[Precision]:
    """Run the body under ``precision``'s autocast (if any) on ``device``'s type, and make it the
    :func:`current_precision` that results files record. The weights are not touched: load the model with
    ``clipheads.load(..., dtype=precision.weights)``."""
    precision = parse_precision(precision)
    token = _CURRENT.set(precision)
    try:
        with precision.autocast(device):
            yield precision
    finally:
        _CURRENT.reset(token)


__all__ = ["ALIASES", "NAMES", "PRECISIONS", "Precision", "current_precision", "parse_precision", "use_precision"]
