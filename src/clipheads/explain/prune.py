"""Soft pruning by CCS: scale down (or mean-replace) the heads of a CCS group, compare with random heads.

A pruning is a :class:`~clipheads.HeadMask` with gate 0 on the pruned heads and an operator: ``scale`` (the heads'
outputs times ``alpha``, default 0) or ``mean`` (their mean output over reference images). Every number is an
evaluation of the model under that mask, by the evaluation functions of :mod:`clipheads.eval`, so a pruning result
is exactly what ``evaluate_*(model, data, mask=mask, op=...)`` reports for the same mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from clipheads.errors import ClipHeadsError
from clipheads.explain.concepts import CCSResult
from clipheads.heads import head_label
from clipheads.interventions import HeadMask, Operator, resolve_operator
from clipheads.models import CLIPBackend

logger = logging.getLogger(__name__)

# task(model, mask or None, operator) -> {metric: value}
Task = Callable[[CLIPBackend, HeadMask | None, Operator], Mapping[str, float]]


def select_heads(result: CCSResult, group: str | None = None, top: int | None = None) -> list[tuple[int, int]]:
    """The heads of a CCS group (``high``, ``moderate``, ``low``) or the ``top`` heads by CCS."""
    if group is None and top is None:
        raise ClipHeadsError("choose the heads to prune: a CCS group (--group high|moderate|low) or the top n heads by "
                             "CCS (--top n)")
    if group is not None and top is not None:
        raise ClipHeadsError("choose the heads to prune by a CCS group or by --top n, not both")
    total = result.shape[0] * result.shape[1]
    if top is not None and top > min(len(result.heads), total - 1):
        # more than were scored would silently prune fewer; every head leaves no other set to compare with at random
        raise ClipHeadsError(f"--top {top} is out of range: {len(result.heads)} heads were scored in a model of "
                             f"{total}; prune at most {min(len(result.heads), total - 1)}")
    heads = result.group(group) if group is not None else result.top(top)
    if not heads:
        if not group:
            raise ClipHeadsError("top 0 heads: nothing to prune")
        sizes = ", ".join(f"{name} {len(result.group(name))}" for name in ("high", "moderate", "low"))
        raise ClipHeadsError(f"no head is in the CCS group {group!r} (groups: {sizes}); prune another group or the "
                             "top n heads by CCS with --top n")
    return heads


def random_heads(n: int, shape: tuple[int, int], seed: int) -> list[tuple[int, int]]:
    """``n`` distinct heads drawn uniformly from all ``shape[0] x shape[1]`` heads, in layer-head order."""
    total = shape[0] * shape[1]
    if not 0 < n <= total:
        raise ClipHeadsError(f"cannot draw {n} random heads from {total}")
    picks = np.random.default_rng(seed).choice(total, n, replace=False)
    return sorted((int(i) // shape[1], int(i) % shape[1]) for i in picks)


@dataclass
class PruneRun:
    """One evaluated head set."""

    name: str
    heads: list[str]
    metrics: dict[str, float]
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneReport:
    """The unpruned model, the chosen heads pruned, and the same number of random heads pruned (per seed)."""

    baseline: dict[str, float]
    selected: PruneRun
    random: list[PruneRun]
    operator: dict
    meta: dict = field(default_factory=dict)

    def changes(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Head set -> metric -> ``(after - before, std over seeds)``: the chosen heads and the random mean."""
        out = {self.selected.name: {m: (v - self.baseline[m], 0.0) for m, v in self.selected.metrics.items()}}
        if self.random:
            deltas = {m: [run.metrics[m] - self.baseline[m] for run in self.random] for m in self.baseline}
            out[f"random x{len(self.random)}"] = {m: (float(np.mean(d)), float(np.std(d))) for m, d in deltas.items()}
        return out

    def rows(self) -> list[list]:
        """``[metric, before, after (chosen), change, random after (mean), random change (mean +- std)]``."""
        rows = []
        for metric, before in self.baseline.items():
            random_after = [run.metrics[metric] for run in self.random]
            mean = float(np.mean(random_after)) if random_after else math.nan
            std = float(np.std(random_after)) if random_after else math.nan
            rows.append([metric, before, self.selected.metrics[metric], self.selected.metrics[metric] - before,
                         mean, mean - before, std])
        return rows

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "selected": self.selected.to_dict(),
                "random": [run.to_dict() for run in self.random], "operator": self.operator, "meta": self.meta,
                "changes": {name: {m: {"mean": d[0], "std": d[1]} for m, d in metrics.items()}
                            for name, metrics in self.changes().items()}}


def prune_mask(heads: Sequence[tuple[int, int]], model: CLIPBackend) -> HeadMask:
    """Gate 0 on ``heads`` (the operator decides what their outputs become)."""
    return HeadMask.from_heads([head_label(*h) for h in heads], model)


def _evaluate(tasks: Mapping[str, Task], model: CLIPBackend, mask: HeadMask | None, operator: Operator
              ) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, task in tasks.items():
        for metric, value in task(model, mask, operator).items():
            metrics[f"{name}/{metric}"] = float(value)
    return metrics


def compare_pruning(model: CLIPBackend, heads: Sequence[tuple[int, int]], tasks: Mapping[str, Task],
                    op: str | Operator = "scale", alpha: float = 0.0, means=None, seeds: Sequence[int] = (0, 1, 2),
                    name: str = "selected", progress: Callable[[str], None] | None = None) -> PruneReport:
    """Evaluate ``tasks`` before pruning, with ``heads`` pruned, and with as many random heads pruned per seed.

    Args:
        model: the backend to evaluate (left unablated afterwards).
        heads: heads to prune, e.g. from :func:`select_heads`.
        tasks: task name -> ``task(model, mask, operator)`` returning metrics (``mask`` is None for the baseline).
        op: ``scale`` (outputs times ``alpha``) or ``mean`` (``means``: ``[n_layers, n_heads, d_head]``).
        seeds: one random head set per seed.
    """
    operator = resolve_operator(op, alpha=alpha, means=means)
    if operator.name not in ("scale", "mean"):
        raise ClipHeadsError(f"soft pruning uses the scale or mean operator, not {operator.name!r}")
    shape = (model.n_layers, model.n_heads)

    def run(run_name: str, chosen: Sequence[tuple[int, int]], seed: int | None = None) -> PruneRun:
        if progress is not None:
            progress(run_name)
        mask = prune_mask(chosen, model)
        return PruneRun(run_name, mask.ablated, _evaluate(tasks, model, mask, operator), seed)

    baseline = _evaluate(tasks, model, None, operator)
    selected = run(name, heads)
    randoms = [run(f"random seed {seed}", random_heads(len(heads), shape, seed), seed) for seed in seeds]
    logger.info("pruned %d heads (%s) and %d random sets", len(heads), name, len(randoms))
    return PruneReport(baseline, selected, randoms, operator.to_dict())
