"""Figures through matplotlib's object API (``matplotlib.figure.Figure``, never pyplot's global state or backend, so a
notebook's own figures and backend are left alone), written as PNG atomically; the one layers x heads heat map."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from clipheads.files import write_bytes_atomic


def new_figure(figsize: tuple[float, float]):
    """A ``matplotlib.figure.Figure`` outside pyplot's global state (nothing to close, safe in threads)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically; a pyplot figure is closed (one from :func:`new_figure` needs no closing)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot (pyplot is then imported): close only it
        import matplotlib.pyplot as plt

        plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


def heads_heatmap(values, figsize: tuple[float, float], title: str, label: str = "", *, scale: dict,
                  fmt: Callable[[float], str] | None = None, text_color: Callable[[float, float], str] | None = None,
                  ticks: Sequence[float] | None = None, fontsize: float = 6.5):
    """The one layers x heads heat map: ``values`` ``[n_layers, n_heads]`` (NaN: drawn with the colormap's "bad"
    colour, no value written) on a new :func:`new_figure` of ``figsize`` inches.

    Args:
        scale: keyword arguments of ``imshow`` that set the colours (``cmap`` with ``vmin``/``vmax`` or ``norm``).
        fmt: writes each finite value in its cell (text gid ``"value:L{l}.H{h}"``); ``None`` writes nothing.
        text_color: ``(value, shade in 0..1)`` -> the text colour (default black).
        ticks: colour bar ticks (default: matplotlib's). fontsize: of the values in the cells.

    Returns:
        ``(fig, ax, image, colorbar)``; :func:`outline_heads` draws boxes around heads on ``ax``.
    """
    import torch

    from clipheads.heads import head_label

    values = torch.as_tensor(values).detach().float().cpu()
    n_layers, n_heads = values.shape
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), aspect="auto", **scale)
    if fmt is not None:
        for layer in range(n_layers):
            for head in range(n_heads):
                value = float(values[layer, head])
                if value != value:  # NaN
                    continue
                color = text_color(value, float(image.norm(value))) if text_color is not None else "black"
                ax.text(head, layer, fmt(value), ha="center", va="center", fontsize=fontsize,
                        color=color, gid=f"value:{head_label(layer, head)}")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, label=label, ticks=ticks)
    return fig, ax, image, bar


def outline_heads(ax, heads: Sequence[str], gid: str, inset: float = 0.03, **style) -> None:
    """Draw a box inside the cell of each head (``L{l}.H{h}`` or any form :func:`clipheads.heads.parse_head` reads)
    of a :func:`heads_heatmap`; each ``Rectangle`` gets gid ``f"{gid}{head}"`` with the canonical label."""
    from matplotlib.patches import Rectangle

    from clipheads.heads import head_label, parse_head

    style = {"fill": False, "edgecolor": "black", "linewidth": 1.6, **style}
    for head in heads:
        layer, h = parse_head(head)
        ax.add_patch(Rectangle((h - 0.5 + inset, layer - 0.5 + inset), 1 - 2 * inset, 1 - 2 * inset,
                               gid=f"{gid}{head_label(layer, h)}", **style))
