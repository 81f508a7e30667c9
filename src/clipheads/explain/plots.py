"""Figures of the explain step: the layers x heads CCS heat map and the pruning comparison (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from clipheads.report.figures import heads_heatmap, new_figure, outline_heads, save_figure


def ccs_figure(scores: torch.Tensor, k: int, title: str = "Concept Consistency Score",
               marked: Sequence[str] = ()):
    """Layers x heads heat map of CCS ``scores`` (``[n_layers, n_heads]``, NaN = not described, drawn grey) on the
    fixed range 0..``k``, each described head's score written in its cell; ``marked`` heads (``L{l}.H{h}``) are
    outlined. Returns a ``matplotlib.figure.Figure`` (value texts have gid ``"value:<head>"``)."""
    from matplotlib import colormaps

    n_layers, n_heads = scores.shape
    fig, ax, _, _ = heads_heatmap(
        scores, (max(4.0, 0.5 * n_heads + 1.8), max(2.5, 0.42 * n_layers + 1.2)), title,
        f"CCS (0..{k}; grey: not described)", scale={"cmap": colormaps["viridis"].with_extremes(bad="#dddddd"),
                                                    "vmin": 0, "vmax": k},
        fmt=lambda value: f"{value:g}", text_color=lambda value, _: "white" if value < 0.6 * k else "black",
        ticks=range(k + 1), fontsize=7)
    outline_heads(ax, marked, "marked:", inset=0.03, edgecolor="#c0392b")
    return fig


def plot_ccs_heatmap(scores: torch.Tensor, path: str | os.PathLike, k: int, title: str = "Concept Consistency Score"
                     ) -> Path:
    """Save :func:`ccs_figure` of ``scores`` (``[n_layers, n_heads]``, NaN = not described) as PNG at ``path``."""
    return save_figure(ccs_figure(scores, k, title), path)


def plot_metric_changes(changes: Mapping[str, Mapping[str, tuple[float, float]]], path: str | os.PathLike,
                        metrics: Sequence[str], title: str = "Soft pruning") -> Path:
    """Grouped bars of the change of each metric per pruned head set.

    Args:
        changes: head set name -> metric -> ``(mean change, std over seeds)`` (std 0 for a single run).
    """
    names = list(changes)
    fig = new_figure((max(5.0, 1.2 * len(metrics) * len(names) / 2 + 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        means = [changes[name].get(m, (float("nan"), 0.0))[0] for m in metrics]
        stds = [changes[name].get(m, (float("nan"), 0.0))[1] for m in metrics]
        errors = stds if any(std > 0 for std in stds) else None  # a single run has no spread to draw
        ax.bar([x + i * width for x in range(len(metrics))], means, width, yerr=errors, label=name, capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(metrics))])
    ax.set_xticklabels(metrics, rotation=20, ha="right")
    ax.set_ylabel("after - before")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
