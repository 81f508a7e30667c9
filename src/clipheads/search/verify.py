"""Check an attribution estimate against the real metric: the heads it ranks most harmful and most beneficial are
ablated one at a time with a :class:`~clipheads.search.MaskEvaluator`, and estimate and exact change are compared.

The estimate is the change of a smooth surrogate of the metric (see :mod:`clipheads.search.attribution`), the exact
change is that of the real metric (e.g. mean recall): the units differ, so agreement is judged by rank (Spearman),
not by value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from clipheads.errors import ClipHeadsError
from clipheads.heads import head_label, parse_head
from clipheads.interventions import HeadMask
from clipheads.report.figures import new_figure, save_figure
from clipheads.search.engine import MaskEvaluator


def estimated_ranking(estimated_delta: torch.Tensor) -> list[str]:
    """Every head of ``estimated_delta [L, H]``, largest estimated gain when ablated (most harmful) first."""
    flat = estimated_delta.flatten().tolist()
    n_heads = estimated_delta.shape[1]
    order = sorted(range(len(flat)), key=lambda i: -flat[i])
    return [head_label(i // n_heads, i % n_heads) for i in order]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists (NaN when fewer than 3 values or one is constant)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


@dataclass
class Verification:
    """Estimated vs exact per-head effects of the verified heads (``group``: ``harmful`` or ``beneficial`` by the
    estimate). ``exact`` is the change of ``metric`` from ``baseline`` when the head alone is ablated."""

    heads: list[str]
    groups: list[str]
    estimated: list[float]
    exact: list[float]
    baseline: float
    metric: str
    operator: str
    split: str = ""

    @property
    def spearman(self) -> float:
        return spearman(self.estimated, self.exact)

    def sign_agreement(self) -> float:
        """Fraction of verified heads whose estimated and exact change have the same sign."""
        same = [(e > 0) == (x > 0) for e, x in zip(self.estimated, self.exact, strict=True)]
        return sum(same) / len(same) if same else float("nan")

    def to_dict(self) -> dict:
        return {"metric": self.metric, "operator": self.operator, "split": self.split, "baseline": self.baseline,
                "spearman": self.spearman, "sign_agreement": self.sign_agreement(),
                "heads": [{"head": h, "group": g, "estimated_delta": e, "exact_delta": x}
                          for h, g, e, x in zip(self.heads, self.groups, self.estimated, self.exact, strict=True)]}


def verify_attribution(evaluator: MaskEvaluator, estimated_delta: torch.Tensor, k: int) -> Verification:
    """Ablate exactly the ``k`` heads with the largest estimated harm and the ``k`` with the largest estimated
    benefit (fewer when the model has under ``2 k`` heads).

    Args:
        evaluator: scores masks with the real metric, on the split (and with the operator) of the estimate.
        estimated_delta: ``[L, H]`` estimated change of the metric's surrogate when each head is ablated.
        k: heads verified at each end of the ranking.
    """
    shape = (evaluator.n_layers, evaluator.n_heads)
    if tuple(estimated_delta.shape) != shape:
        raise ClipHeadsError(f"estimated effects have shape {tuple(estimated_delta.shape)}, the model's heads {shape}")
    if k < 1:
        raise ClipHeadsError(f"--verify-top must be at least 1, got {k}")
    ranking = estimated_ranking(estimated_delta)
    harmful = ranking[:k]
    beneficial = [label for label in reversed(ranking) if label not in harmful][:k]
    heads = harmful + beneficial
    exact = evaluator.evaluate_many([HeadMask.from_heads([label], shape) for label in heads], desc="verify")
    return Verification(heads, ["harmful"] * len(harmful) + ["beneficial"] * len(beneficial),
                        [float(estimated_delta[parse_head(label)]) for label in heads],
                        [score - evaluator.baseline for score in exact], evaluator.baseline,
                        evaluator.objective.name, evaluator.operator.describe(), evaluator.split)


def plot_estimate_vs_exact(verification: Verification, path: str | os.PathLike) -> Path:
    """Scatter of estimated (x) vs exact (y) change per verified head, each point labelled with its head."""
    fig = new_figure((5.2, 4.2))
    ax = fig.add_subplot()
    colours = {"harmful": "#c0392b", "beneficial": "#2e86c1"}
    for group, colour in colours.items():
        points = [(e, x) for g, e, x in zip(verification.groups, verification.estimated, verification.exact,
                                            strict=True) if g == group]
        if points:
            ax.scatter(*zip(*points, strict=True), color=colour, label=f"estimated most {group}")
    for label, e, x in zip(verification.heads, verification.estimated, verification.exact, strict=True):
        ax.annotate(label, (e, x), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("estimated change of the surrogate (attribution)")
    ax.set_ylabel(f"exact change of {verification.metric}")
    ax.set_title(f"Attribution vs exact ({verification.operator}), Spearman {verification.spearman:.2f}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
