"""Greedy forward selection: add, one at a time, the head whose ablation raises the fitness most; stop when none does.

A simple baseline for AAT-GA. Each step scores every remaining candidate together with the heads chosen so far
(batched, memoised, sharded like every other evaluation) and is checkpointed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from typing_extensions import TypedDict

from clipheads.errors import require
from clipheads.heads import head_label
from clipheads.interventions import HeadMask
from clipheads.search.engine import MaskEvaluator
from clipheads.search.results import SearchResult, check_splits, fitness, report_heldout, write_result
from clipheads.search.scan import ScanResult
from clipheads.search.state import RunFolder


class GreedyState(TypedDict):
    """``state.json`` of greedy forward selection: the heads chosen so far and whether it has stopped."""

    chosen: list[str]
    metric: float
    fitness: float
    history: list[dict]
    done: bool

log = logging.getLogger(__name__)


@dataclass
class GreedyConfig:
    """``candidates``: only the most harmful heads of a scan are tried (default: every head)."""

    beta: float = 0.0
    max_heads: int | None = None
    candidates: int | None = None
    min_gain: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_heads", "candidates"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"greedy {name.replace('_', ' ')} must be at least 1 (got {value})")

    def to_dict(self) -> dict:
        return asdict(self)


def greedy_search(evaluator: MaskEvaluator, config: GreedyConfig, out: RunFolder | None = None,
                  scan: ScanResult | None = None, report: MaskEvaluator | None = None,
                  allow_same_split: bool = False) -> SearchResult:
    """Forward selection on ``evaluator``'s split, checkpointed after every chosen head."""
    check_splits(evaluator, report, allow_same_split)
    started = time.perf_counter()
    shape = (evaluator.n_layers, evaluator.n_heads)
    n_total = shape[0] * shape[1]
    pool = [head_label(l_, h) for l_ in range(shape[0]) for h in range(shape[1])]
    if scan is not None and config.candidates is not None:
        pool = scan.ranking()[: config.candidates]
    state = (out.load_state(schema=GreedyState) if out else None) or {"chosen": [], "metric": evaluator.baseline,
                                                    "fitness": evaluator.baseline, "history": [], "done": False}
    chosen: list[str] = state["chosen"]
    limit = config.max_heads if config.max_heads is not None else len(pool)
    while not state["done"] and len(chosen) < limit:
        candidates = [label for label in pool if label not in chosen]
        if not candidates:
            break
        metrics = evaluator.evaluate_many([HeadMask.from_heads(chosen + [c], shape) for c in candidates],
                                          desc=f"greedy step {len(chosen) + 1}/{limit}")
        scores = [fitness(m, len(chosen) + 1, n_total, config.beta) for m in metrics]
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        if scores[best] <= state["fitness"] + config.min_gain:
            state["done"] = True
        else:
            chosen.append(candidates[best])
            state.update(metric=metrics[best], fitness=scores[best])
            state["history"].append({"step": len(chosen), "head": candidates[best], "metric": metrics[best],
                                     "fitness": scores[best], "evaluations": evaluator.n_evaluated})
            log.info("greedy step %d: + %s (%s %.4f)", len(chosen), candidates[best], evaluator.objective.name,
                     metrics[best])
        if out is not None:
            out.save_state(state)
            out.write_history(state["history"])
    mask = HeadMask.from_heads(chosen, evaluator.backend)
    result = SearchResult("greedy", mask, evaluator.objective.name, evaluator.operator.describe(), config.beta,
                          evaluator.split, state["metric"], evaluator.baseline, state["fitness"],
                          evaluations=evaluator.n_evaluated, history=state["history"],
                          wall_seconds=time.perf_counter() - started,
                          extra={"config": config.to_dict(), "cache_plan": evaluator.plan.to_dict()})
    report_heldout(result, report)
    write_result(result, out)
    return result
