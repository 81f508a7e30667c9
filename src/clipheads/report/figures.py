"""matplotlib without a display (Agg), and PNG figures written atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path

from clipheads.files import write_bytes_atomic


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: plotting is optional work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(figsize: tuple[float, float]):
    """A ``matplotlib.figure.Figure`` outside pyplot's global state (nothing to close, safe in threads)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically; a pyplot figure is closed (one from :func:`new_figure` needs no closing)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    if getattr(fig.canvas, "manager", None) is not None:
        pyplot().close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)
