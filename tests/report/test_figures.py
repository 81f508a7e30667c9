"""Figures go through matplotlib's object API: a user's pyplot figures and backend are left as they were."""

from __future__ import annotations

import matplotlib
import torch

from clipheads.search.plots import plot_fitness, plot_head_effects


def test_plotting_leaves_pyplot_and_the_backend_alone(tmp_path):
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    mine = plt.figure()  # a notebook user's own figure
    try:
        plot_head_effects(torch.tensor([[0.5, -1.0], [0.0, 2.0]]), tmp_path / "h.png", marked=["L0.H1"])
        plot_fitness([{"generation": 0, "best_fitness": 1.0, "mean_fitness": 0.5, "best_metric": 0.9}],
                     tmp_path / "f.png")
        assert plt.fignum_exists(mine.number) and plt.get_fignums() == [mine.number]
        assert matplotlib.get_backend() == backend
    finally:
        plt.close(mine)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.png").stat().st_size > 0
