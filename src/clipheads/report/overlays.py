"""Heat maps over images (attention maps, spatial decompositions) as PNG files or small embedded data URIs.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never pyplot's global state.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipheads.errors import ClipHeadsError
from clipheads.report.figures import new_figure, save_figure


def _values(values: torch.Tensor | np.ndarray) -> np.ndarray:
    array = values.detach().cpu().float().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if array.ndim != 2:
        raise ClipHeadsError(f"a heat map is [rows, cols]; got shape {array.shape}")
    return array


def overlay_figure(image: Image.Image, values: torch.Tensor | np.ndarray, title: str = "", signed: bool = False,
                   size: float = 2.4):
    """``image`` with ``values`` (``[g, g]``, one per patch) stretched over it.

    ``signed``: a diverging colour map centred on 0 (spatial decompositions: red pushes towards the text, blue
    away); else a sequential one from 0 (attention). A colour bar gives the scale.
    """
    array = _values(values)
    fig = new_figure((size * 1.25, size))
    ax = fig.add_subplot()
    ax.imshow(image.convert("RGB"))
    width, height = image.size
    if signed:
        bound = float(np.abs(array).max()) or 1.0
        shown = ax.imshow(array, cmap="RdBu_r", vmin=-bound, vmax=bound, alpha=0.55, extent=(0, width, height, 0),
                          interpolation="nearest")
    else:
        shown = ax.imshow(array, cmap="inferno", vmin=0.0, vmax=float(array.max()) or 1.0, alpha=0.6,
                          extent=(0, width, height, 0), interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return fig


def save_overlay(image: Image.Image, values: torch.Tensor | np.ndarray, path: str | os.PathLike, title: str = "",
                 signed: bool = False) -> Path:
    """Write :func:`overlay_figure` as a PNG file (atomically)."""
    return save_figure(overlay_figure(image, values, title, signed), path)


def figure_data_uri(fig, dpi: int = 60) -> str:
    """A small PNG ``data:`` URI of ``fig`` (for self-contained HTML)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_data_uri(image: Image.Image, side: int = 96, quality: int = 80) -> str:
    """A JPEG ``data:`` URI of ``image`` shrunk to fit ``side`` x ``side`` pixels."""
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
