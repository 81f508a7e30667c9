"""Figures of the explain step: the layers x heads CCS heat map and the pruning comparison (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from clipheads.report.figures import pyplot, save_figure


def plot_ccs_heatmap(scores: torch.Tensor, path: str | os.PathLike, k: int, title: str = "Concept Consistency Score"
                     ) -> Path:
    """Save a layers x heads heat map of ``scores`` (``[n_layers, n_heads]``, NaN = not described) as PNG."""
    plt = pyplot()
    n_layers, n_heads = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_heads + 1.5), max(2.5, 0.4 * n_layers + 1.2)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(scores.numpy(), cmap=cmap, vmin=0, vmax=k, aspect="auto")
    for layer in range(n_layers):
        for head in range(n_heads):
            value = float(scores[layer, head])
            if value == value:  # not NaN
                ax.text(head, layer, f"{value:g}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * k else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=f"CCS (0..{k})")
    return save_figure(fig, path)


def plot_metric_changes(changes: Mapping[str, Mapping[str, tuple[float, float]]], path: str | os.PathLike,
                        metrics: Sequence[str], title: str = "Soft pruning") -> Path:
    """Grouped bars of the change of each metric per pruned head set.

    Args:
        changes: head set name -> metric -> ``(mean change, std over seeds)`` (std 0 for a single run).
    """
    plt = pyplot()
    names = list(changes)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(metrics) * len(names) / 2 + 2), 3.6))
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
