"""The CCS heat map: fixed range 0..k whatever the scores, every described head's score written in its cell."""

from __future__ import annotations

import torch

from clipheads.explain.plots import ccs_figure, plot_ccs_heatmap


def test_ccs_heat_map_has_fixed_range_and_values(tmp_path):
    scores = torch.tensor([[1.0, 2.0], [float("nan"), 1.0]])
    fig = ccs_figure(scores, k=5, marked=["L0.H1"])
    assert fig.axes[0].images[0].get_clim() == (0, 5)  # not the automatic 1..2
    texts = {t.get_gid(): t.get_text() for t in fig.axes[0].texts}
    assert texts == {"value:L0.H0": "1", "value:L0.H1": "2", "value:L1.H1": "1"}  # NaN: not described, no value
    assert [p.get_gid() for p in fig.axes[0].patches] == ["marked:L0.H1"]
    assert plot_ccs_heatmap(scores, tmp_path / "ccs.png", k=5).read_bytes()[:4] == b"\x89PNG"
