"""What a search returns and writes: the best mask, its metric on the search and held-out splits, the history."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from clipheads.errors import ClipHeadsError
from clipheads.interventions import HeadMask
from clipheads.search import plots
from clipheads.search.engine import MaskEvaluator
from clipheads.search.state import RunFolder

log = logging.getLogger(__name__)


def fitness(metric: float, n_ablated: int, n_heads_total: int, beta: float) -> float:
    """AAT fitness: ``metric - beta * fraction of heads ablated`` (beta in units of the metric)."""
    return metric - beta * n_ablated / n_heads_total


def check_splits(search: MaskEvaluator, report: MaskEvaluator | None, allow_same_split: bool = False) -> None:
    """Refuse to report a search on the split it was searched on, unless explicitly allowed."""
    if report is None or allow_same_split:
        return
    if report is search or (search.split and search.split == report.split):
        raise same_split_error(search.split or "the same images")


def same_split_error(split: str) -> ClipHeadsError:
    return ClipHeadsError(f"the search split and the report split are both {split!r}; report on held-out data "
                          "(--report-split, or --report-data for a dataset without splits) or pass --allow-same-split")


@dataclass
class SearchResult:
    """The outcome of one search strategy (GA, BP, greedy, or the best top-k mask of a scan)."""

    strategy: str
    mask: HeadMask
    metric: str
    operator: str
    beta: float
    search_split: str
    search_metric: float
    search_baseline: float
    fitness: float
    report_split: str | None = None
    heldout_metric: float | None = None
    heldout_baseline: float | None = None
    evaluations: int = 0
    wall_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    gates: torch.Tensor | None = None  # AAT-BP: learned gates [L, H] before thresholding
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        n_total = self.mask.shape[0] * self.mask.shape[1]
        out = {
            "strategy": self.strategy, "metric": self.metric, "operator": self.operator, "beta": self.beta,
            "search": {"split": self.search_split, "vanilla": self.search_baseline, "ablated": self.search_metric,
                       "change": self.search_metric - self.search_baseline},
            "heldout": None if self.heldout_metric is None else {
                "split": self.report_split, "vanilla": self.heldout_baseline, "ablated": self.heldout_metric,
                "change": self.heldout_metric - self.heldout_baseline},
            "fitness": self.fitness,
            "mask": {"ablated": self.mask.ablated, "n_ablated": self.mask.n_ablated,
                     "fraction": self.mask.n_ablated / n_total, "heads_per_layer": self.mask.heads_per_layer()},
            "evaluations": self.evaluations, "wall_seconds": self.wall_seconds,
        }
        if self.gates is not None:
            out["gates"] = self.gates.detach().cpu().tolist()
        out.update(self.extra)
        if self.mask.n_ablated == 0:
            out["nothing_ablated"] = self.why_nothing_ablated()
        return out

    def why_nothing_ablated(self) -> str | None:
        """One line on why the search ended with no head ablated, and what to try; ``None`` when heads are ablated.

        AAT-BP: the lowest learned gate against the threshold (e.g. ``lowest gate 0.55 (L1.H1) > threshold 0.5``);
        the other strategies: no head set beat the unablated model on the search split."""
        if self.mask.n_ablated:
            return None
        split = self.search_split or "the search split"
        if self.gates is not None:
            gates = self.gates.detach().float().cpu()
            config = self.extra.get("config", {})
            threshold = config.get("threshold", 0.5)
            lowest = int(gates.argmin())
            head = f"L{lowest // gates.shape[1]}.H{lowest % gates.shape[1]}"
            settings = ", ".join(f"--{key.replace('_', '-')} {config[key]:g}" for key in ("init_logit", "lr", "epochs")
                                 if key in config)
            epochs = len(self.history)
            return (f"nothing ablated: lowest gate {float(gates.min()):.2f} ({head}) >= threshold {threshold:g} after "
                    f"{epochs} epoch{'' if epochs == 1 else 's'} on {split} ({settings}); try a lower --init-logit, "
                    "a higher --lr or more --epochs")
        what = {"ga": "no mask of the population", "greedy": "no single head added to the mask"}.get(
            self.strategy, "no top-k set of the heads ranked most harmful")
        return (f"nothing ablated: {what} beat the unablated model on {split} ({self.metric} "
                f"{self.search_baseline:.4f}, beta {self.beta:g}); try a smaller --beta, another --op, or a larger "
                "search split (a scan's head_effects.png shows whether any head helps alone)")


def report_heldout(result: SearchResult, report: MaskEvaluator | None) -> SearchResult:
    """Fill in the held-out metric of the result's mask and of the unablated model."""
    if report is not None:
        result.report_split = report.split
        result.heldout_baseline = report.baseline
        result.heldout_metric = report.evaluate(result.mask)
    return result


def write_result(result: SearchResult, folder: RunFolder | None) -> None:
    """``mask.json``, ``summary.json`` and ``heads_per_layer.png`` (+ ``fitness.png`` for a GA) in ``folder``."""
    if folder is None or not folder.distributed.is_main:
        return
    mask = HeadMask(result.mask.gates.detach().clone(), result.mask.architecture,
                    meta={"strategy": result.strategy, "operator": result.operator, "metric": result.metric,
                          "beta": result.beta, "search_split": result.search_split})
    mask.save(folder.file("mask.json"))
    folder.write_json("summary.json", result.to_dict())
    plots.plot_heads_per_layer(mask.heads_per_layer(), mask.shape[1], folder.file("heads_per_layer.png"),
                               title=f"{result.strategy}: ablated heads per layer ({mask.n_ablated})")
    if result.history and "best_fitness" in result.history[0]:
        plots.plot_fitness(result.history, folder.file("fitness.png"),
                           title=f"{result.strategy} (beta={result.beta:g})")
    if result.gates is not None:
        plots.plot_head_effects(result.gates.detach().cpu(), folder.file("gates.png"), title="AAT-BP learned gates",
                                label="gate (1 keep, 0 ablate)", gates=True, marked=mask.ablated)
    log.info("%s: %d heads ablated, %s %.4f -> %.4f on %s", result.strategy, mask.n_ablated, result.metric,
             result.search_baseline, result.search_metric, result.search_split or "the search split")
    if mask.n_ablated == 0:
        # the CLI prints this line under its result table, so its log handler skips the record (cli_prints)
        log.warning("%s: %s", result.strategy, result.why_nothing_ablated(), extra={"cli_prints": True})
