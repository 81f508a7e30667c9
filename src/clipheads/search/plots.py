"""Figures of a search (matplotlib, Agg, written atomically): head-effect heat map, ablated heads per layer,
fitness over generations, metric vs beta, layer-scan bars."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from clipheads.report.figures import pyplot, save_figure


def plot_head_effects(delta: torch.Tensor, path: str | os.PathLike, title: str = "Single-head ablation",
                      label: str = "metric change when ablated", gates: bool = False) -> Path:
    """Layers x heads heat map of ``delta`` ``[L, H]`` (red: ablating the head helps, i.e. a harmful head).

    With ``gates``, the values are gates in [0, 1] (1 keep, 0 ablate) on a sequential colour scale."""
    plt = pyplot()
    n_layers, n_heads = delta.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_heads + 2.0), max(2.5, 0.35 * n_layers + 1.2)))
    bound = float(delta.abs().max()) or 1.0
    scale = {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0} if gates else {"cmap": "RdBu_r", "vmin": -bound,
                                                                          "vmax": bound}
    image = ax.imshow(delta.float().numpy(), aspect="auto", **scale)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    return save_figure(fig, path)


def plot_heads_per_layer(heads_per_layer: Sequence[int], n_heads: int, path: str | os.PathLike,
                         title: str = "Ablated heads per layer") -> Path:
    """Bar chart of the number of ablated heads in each layer."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(heads_per_layer) + 1.5), 3.0))
    ax.bar(range(len(heads_per_layer)), list(heads_per_layer), color="#c0392b")
    ax.set_xticks(range(len(heads_per_layer)))
    ax.set_ylim(0, n_heads)
    ax.set_xlabel("layer")
    ax.set_ylabel("ablated heads")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_fitness(history: Sequence[dict], path: str | os.PathLike, title: str = "AAT-GA") -> Path:
    """Best and mean fitness (and best metric) over generations, from GA history records."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    steps = [r["generation"] for r in history]
    ax.plot(steps, [r["best_fitness"] for r in history], marker="o", label="best fitness")
    ax.plot(steps, [r["mean_fitness"] for r in history], marker=".", label="mean fitness")
    ax.plot(steps, [r["best_metric"] for r in history], linestyle="--", label="metric of best")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_beta_curve(betas: Sequence[float], search_metric: Sequence[float], heldout_metric: Sequence[float | None],
                    path: str | os.PathLike, baseline: float | None = None, metric: str = "metric") -> Path:
    """Metric of the best mask vs beta, on the search split and (where known) the held-out split."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.plot(betas, search_metric, marker="o", label="search split")
    if any(v is not None for v in heldout_metric):
        ax.plot(betas, [float("nan") if v is None else v for v in heldout_metric], marker="s", label="held-out")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle=":", label="unablated (search split)")
    ax.set_xlabel("beta")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs beta")
    ax.legend()
    return save_figure(fig, path)


def plot_layer_scan(labels: Sequence[str], values: Sequence[float], baseline: float, path: str | os.PathLike,
                    metric: str = "metric", title: str = "Layer scan") -> Path:
    """Bars of the metric with all heads of each layer (range) cancelled, against the unablated model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(labels) + 1.5), 3.2))
    ax.bar(range(len(labels)), list(values), color="#2e86c1")
    ax.axhline(baseline, color="grey", linestyle=":", label="unablated")
    ax.set_xticks(range(len(labels)), list(labels), rotation=45 if len(labels) > 8 else 0)
    ax.set_xlabel("layers cancelled")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
