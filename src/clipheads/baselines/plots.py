"""Figures of the AAT vs fine-tuning comparison (matplotlib, Agg, written atomically): held-out mean-R against
trainable parameters and against training wall time, and validation mean-R per epoch."""

from __future__ import annotations

import os
from pathlib import Path

from clipheads.baselines.compare import ComparisonResult
from clipheads.report.figures import new_figure, save_figure

_COLOURS = {"reference": "#7f8c8d", "ablation": "#c0392b", "fine-tuning": "#2471a3"}
_LINES = {"vanilla": ("#7f8c8d", ":"), "aat-ga": ("#c0392b", "--"), "aat-bp": ("#e67e22", "-.")}
_CURVES = ("#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#8c564b", "#bcbd22")
_MARKERS = {"reference": "s", "ablation": "*", "fine-tuning": "o"}


def _scatter(result: ComparisonResult, path: str | os.PathLike, x_of, xlabel: str, log_x: bool) -> Path:
    fig = new_figure((5.6, 3.8))
    ax = fig.add_subplot()
    for row in result.rows:
        x = x_of(row)
        ax.scatter([x], [100 * row.test_mean_recall], color=_COLOURS[row.family], marker=_MARKERS[row.family],
                   s=110 if row.family == "ablation" else 55, zorder=3)
        ax.annotate(row.method, (x, 100 * row.test_mean_recall), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"held-out mean-R on {result.test_split} (%)")
    ax.grid(alpha=0.3)
    ax.set_title("AAT against fine-tuning and PEFT")
    return save_figure(fig, path)


def plot_recall_vs_params(result: ComparisonResult, path: str | os.PathLike) -> Path:
    """Held-out mean-R against the number of trainable parameters (log x; AAT: one bit per head; vanilla at 1)."""
    return _scatter(result, path, lambda r: max(1, r.trainable_params),
                    "trainable parameters (log; AAT masks: bits, one per head; vanilla drawn at 1)", True)


def plot_recall_vs_time(result: ComparisonResult, path: str | os.PathLike) -> Path:
    """Held-out mean-R against training (or search) wall time on the training split."""
    return _scatter(result, path, lambda r: r.wall_time_s, "training / search wall time (s)", False)


def plot_epoch_curves(result: ComparisonResult, path: str | os.PathLike) -> Path:
    """Validation mean-R after every epoch of each fine-tuning run; vanilla and AAT masks as horizontal lines."""
    fig = new_figure((5.6, 3.8))
    ax = fig.add_subplot()
    vanilla = next((r for r in result.rows if r.method == "vanilla"), None)
    curves = iter(_CURVES * len(result.rows))
    for row in result.rows:
        if row.family == "fine-tuning":
            epochs = [e["epoch"] for e in row.per_epoch]
            values = [100 * e["val_mean_recall"] for e in row.per_epoch]
            if vanilla is not None:  # epoch 0: the model before training
                epochs, values = [0, *epochs], [100 * vanilla.val_mean_recall, *values]
            ax.plot(epochs, values, marker="o", color=next(curves), label=row.method)
        else:
            colour, style = _LINES.get(row.method, (_COLOURS[row.family], "--"))
            ax.axhline(100 * row.val_mean_recall, color=colour, linestyle=style, label=row.method)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation mean-R on {result.val_split} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("mean-R per epoch")
    return save_figure(fig, path)


def plot_comparison(result: ComparisonResult, out_dir: str | os.PathLike) -> list[Path]:
    """The three figures into ``out_dir``: recall_vs_params.png, recall_vs_time.png, epoch_curves.png."""
    out = Path(out_dir)
    return [plot_recall_vs_params(result, out / "recall_vs_params.png"),
            plot_recall_vs_time(result, out / "recall_vs_time.png"),
            plot_epoch_curves(result, out / "epoch_curves.png")]
