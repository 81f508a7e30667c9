"""The head-effect heat map: both signs visible on a two-slope scale, values written in the cells, ablated heads
outlined."""

from __future__ import annotations

import pytest
import torch

from clipheads.search.plots import head_effects_figure, plot_head_effects


def _delta() -> torch.Tensor:
    delta = torch.full((3, 4), -15.0)
    delta[1, 2], delta[2, 0], delta[0, 3] = 0.07, 1.0, 0.0
    return delta


def test_small_gains_beside_large_losses_are_red():
    fig = head_effects_figure(_delta(), marked=["L1.H2"])
    image = fig.axes[0].images[0]
    # a two-slope norm centred at 0: the largest gain maps to the top of the scale although |loss| is 15x larger
    assert image.norm(0.0) == pytest.approx(0.5)
    assert image.norm(1.0) == pytest.approx(1.0) and image.norm(-15.0) == pytest.approx(0.0)
    assert image.norm(0.07) > 0.53
    texts = {t.get_gid(): t.get_text() for t in fig.axes[0].texts}
    assert texts["value:L1.H2"] == "+0.07" and texts["value:L2.H0"] == "+1.00" and texts["value:L0.H0"] == "-15.00"
    assert len(texts) == 12


def test_ablated_heads_are_outlined_per_mask():
    marked = {"greedy": ["L1.H2", "L2.H0"], "AAT-BP": ["L1H2"]}
    fig = head_effects_figure(_delta(), marked=marked)
    boxes = {p.get_gid(): p for p in fig.axes[0].patches}
    assert set(boxes) == {"ablated:greedy:L1.H2", "ablated:greedy:L2.H0", "ablated:AAT-BP:L1.H2"}
    x, y = boxes["ablated:greedy:L2.H0"].get_xy()
    assert (round(x + 0.5), round(y + 0.5)) == (0, 2)  # column = head 0, row = layer 2
    assert boxes["ablated:greedy:L1.H2"].get_linestyle() != boxes["ablated:AAT-BP:L1.H2"].get_linestyle()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["ablated by greedy", "ablated by AAT-BP"]


def test_gates_and_png(tmp_path):
    gates = torch.tensor([[0.9, 0.2], [0.6, 1.0]])
    fig = head_effects_figure(gates, gates=True, marked=["L0.H1"])
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    assert [p.get_gid() for p in fig.axes[0].patches] == ["ablated::L0.H1"]
    path = plot_head_effects(_delta(), tmp_path / "h.png", marked=["L0.H0"])
    assert path.read_bytes()[:4] == b"\x89PNG"
