"""PNG overlays and data URIs of heat maps over images."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipheads.errors import ClipHeadsError
from clipheads.report.overlays import figure_data_uri, overlay_figure, save_overlay, thumbnail_data_uri


def test_overlay_png_and_uris(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    values = torch.linspace(-1, 1, 16).reshape(4, 4)
    path = save_overlay(image, values, tmp_path / "map.png", title="L0.H1", signed=True)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 50
    uri = figure_data_uri(overlay_figure(image, values.abs()))
    assert uri.startswith("data:image/png;base64,")
    thumb = thumbnail_data_uri(image, side=32)
    with Image.open(io.BytesIO(base64.b64decode(thumb.split(",", 1)[1]))) as decoded:
        assert decoded.format == "JPEG" and max(decoded.size) == 32
    with pytest.raises(ClipHeadsError, match="rows, cols"):
        overlay_figure(image, values.flatten())
