"""Figures of a search (matplotlib, Agg, written atomically): head-effect heat map, ablated heads per layer,
fitness over generations, metric vs beta, layer-scan bars."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from clipheads.report.figures import heads_heatmap, new_figure, outline_heads, save_figure

MARK_STYLES = ({"linestyle": "-", "inset": 0.03}, {"linestyle": "--", "inset": 0.10}, {"linestyle": ":", "inset": 0.17})


def _decimals(values: torch.Tensor) -> int:
    """Decimals that show the smallest non-zero magnitude with one significant digit (1 to 4)."""
    nonzero = values.abs()[values != 0]
    if not len(nonzero):
        return 1
    return int(min(4, max(1, -math.floor(math.log10(float(nonzero.min()))))))


def head_effects_figure(delta: torch.Tensor, title: str = "Single-head ablation",
                        label: str = "metric change when ablated", gates: bool = False,
                        marked: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
                        annotate: bool | None = None):
    """Layers x heads heat map of ``delta`` ``[L, H]`` as a ``matplotlib.figure.Figure``.

    Colours: a two-slope scale centred at 0 (:class:`matplotlib.colors.TwoSlopeNorm`), red where ablating the head
    helps (a harmful head) and blue where it hurts, each sign stretched to its own extreme, so a +0.5 beside a -15
    is still visibly red. With ``gates``, the values are gates in [0, 1] (1 keep, 0 ablate) on a fixed sequential
    scale instead.

    Args:
        delta: ``[n_layers, n_heads]`` values (NaN: not measured, drawn grey).
        marked: heads to outline (e.g. a search's ablated heads): a list of ``L{layer}.H{head}`` labels, or a
            mapping name -> labels (up to three masks, each with its own outline style and a legend entry).
        annotate: write each cell's value in it (default: when there are at most 400 cells).

    Returns:
        The figure; each outline is a ``Rectangle`` in ``fig.axes[0].patches`` whose gid is
        ``"ablated:<name>:<head>"`` (name ``""`` for a plain list).
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.lines import Line2D

    values = delta.detach().float().cpu()
    n_layers, n_heads = values.shape
    finite = values[torch.isfinite(values)]
    if gates:
        scale = {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0}
    else:
        low = float(finite.min()) if len(finite) else 0.0
        high = float(finite.max()) if len(finite) else 0.0
        bound = max(abs(low), abs(high)) or 1.0
        # both sides need a range; a side without values mirrors the other
        norm = TwoSlopeNorm(vcenter=0.0, vmin=low if low < 0 else -bound, vmax=high if high > 0 else bound)
        scale = {"cmap": "RdBu_r", "norm": norm}
    digits = 2 if gates else _decimals(finite)
    write = annotate if annotate is not None else n_layers * n_heads <= 400
    fig, ax, _, bar = heads_heatmap(
        values, (max(4.0, 0.6 * n_heads + 2.2), max(2.5, 0.45 * n_layers + 1.3)), title, label, scale=scale,
        fmt=(lambda value: f"{value:.{digits}f}" if gates else f"{value:+.{digits}f}") if write else None,
        text_color=lambda _, shade: "white" if (shade < 0.4 if gates else abs(shade - 0.5) > 0.3) else "black")
    if not gates:  # each sign gets half of the bar, as in the cells (ticks stay in data units)
        bar.ax.set_yscale("function", functions=(norm, norm.inverse))
        bar.set_ticks([norm.vmin, norm.vmin / 2, 0.0, norm.vmax / 2, norm.vmax])
        bar.ax.yaxis.set_major_formatter(f"{{x:+.{_decimals(torch.tensor([norm.vmax, norm.vmin]))}f}}")
    groups = dict(marked) if isinstance(marked, Mapping) else {"": list(marked or [])}
    if len(groups) > len(MARK_STYLES):
        raise ValueError(f"at most {len(MARK_STYLES)} marked masks per heat map (got {len(groups)})")
    handles = []
    for (name, heads), style in zip(groups.items(), MARK_STYLES, strict=False):
        outline_heads(ax, heads, f"ablated:{name}:", inset=style["inset"], linestyle=style["linestyle"])
        if heads:
            handles.append(Line2D([], [], color="black", linewidth=1.6, linestyle=style["linestyle"],
                                  label=f"ablated by {name}" if name else "ablated"))
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14 if n_layers > 3 else -0.25),
                  ncol=len(handles), fontsize=8, frameon=False)
    return fig


def plot_head_effects(delta: torch.Tensor, path: str | os.PathLike, title: str = "Single-head ablation",
                      label: str = "metric change when ablated", gates: bool = False,
                      marked: Mapping[str, Sequence[str]] | Sequence[str] | None = None) -> Path:
    """Save :func:`head_effects_figure` of ``delta`` ``[L, H]`` as PNG at ``path`` (red: ablating the head helps;
    ``marked`` heads outlined)."""
    return save_figure(head_effects_figure(delta, title, label, gates, marked), path)


def plot_heads_per_layer(heads_per_layer: Sequence[int], n_heads: int, path: str | os.PathLike,
                         title: str = "Ablated heads per layer") -> Path:
    """Bar chart of the number of ablated heads in each layer."""
    fig = new_figure((max(4.0, 0.4 * len(heads_per_layer) + 1.5), 3.0))
    ax = fig.add_subplot()
    ax.bar(range(len(heads_per_layer)), list(heads_per_layer), color="#c0392b")
    ax.set_xticks(range(len(heads_per_layer)))
    ax.set_ylim(0, n_heads)
    ax.set_xlabel("layer")
    ax.set_ylabel("ablated heads")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_fitness(history: Sequence[dict], path: str | os.PathLike, title: str = "AAT-GA") -> Path:
    """Best and mean fitness (and best metric) over generations, from GA history records."""
    fig = new_figure((5.0, 3.2))
    ax = fig.add_subplot()
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
    fig = new_figure((5.0, 3.2))
    ax = fig.add_subplot()
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
    fig = new_figure((max(4.0, 0.5 * len(labels) + 1.5), 3.2))
    ax = fig.add_subplot()
    ax.bar(range(len(labels)), list(values), color="#2e86c1")
    ax.axhline(baseline, color="grey", linestyle=":", label="unablated")
    ax.set_xticks(range(len(labels)), list(labels), rotation=45 if len(labels) > 8 else 0)
    ax.set_xlabel("layers cancelled")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
