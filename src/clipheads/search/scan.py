"""Single-head scan (every head ablated alone) and layer scan (every head of a layer or layer range cancelled)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from typing_extensions import TypedDict

from clipheads.heads import head_label, layer_group_label, parse_head, parse_layer_ranges, parse_layers
from clipheads.interventions import HeadMask
from clipheads.search import plots
from clipheads.search.engine import MaskEvaluator
from clipheads.search.results import SearchResult
from clipheads.search.state import RunFolder


class ScanState(TypedDict):
    """``state.json`` of a scan: the metric of every head scored so far."""

    scores: dict[str, float]

if TYPE_CHECKING:
    from clipheads.captions.layerwise import GroupCaptions, LayerwiseCaptioning

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    """Metric with each head ablated alone. ``scores[l, h]``: metric with head ``L{l}.H{h}`` ablated; ``delta`` =
    ``scores - baseline`` (positive: ablating the head helps, the head is harmful)."""

    baseline: float
    scores: torch.Tensor
    metric: str
    operator: str
    split: str = ""
    top_k: list[dict] = field(default_factory=list)  # [{"k", "heads", "metric"}]: the k most harmful heads together

    @property
    def delta(self) -> torch.Tensor:
        return self.scores - self.baseline

    def ranking(self) -> list[str]:
        """Every head, most harmful first (largest metric gain when ablated; ties in layer-head order)."""
        flat = self.delta.flatten().tolist()
        order = sorted(range(len(flat)), key=lambda i: -flat[i])
        n_heads = self.scores.shape[1]
        return [head_label(i // n_heads, i % n_heads) for i in order]

    def harmful(self) -> list[str]:
        """Heads whose ablation alone improves the metric, most harmful first."""
        return [label for label in self.ranking() if float(self.delta[parse_head(label)]) > 0]

    def top_k_mask(self, k: int) -> HeadMask:
        """The mask ablating the ``k`` most harmful heads."""
        return HeadMask.from_heads(self.ranking()[:k], tuple(self.scores.shape))

    def best_top_k(self) -> dict | None:
        """The top-k entry with the highest metric (``None`` if no top-k mask was evaluated)."""
        return max(self.top_k, key=lambda e: e["metric"]) if self.top_k else None

    def to_dict(self) -> dict:
        return {"metric": self.metric, "operator": self.operator, "split": self.split, "baseline": self.baseline,
                "scores": self.scores.tolist(), "delta": self.delta.tolist(),
                "heads": {label: {"metric": float(self.scores[parse_head(label)]),
                                  "delta": float(self.delta[parse_head(label)])} for label in self.ranking()},
                "harmful": self.harmful(), "top_k": self.top_k}

    @classmethod
    def from_dict(cls, data: dict) -> ScanResult:
        return cls(float(data["baseline"]), torch.tensor(data["scores"]), data["metric"], data["operator"],
                   data.get("split", ""), list(data.get("top_k", [])))


def single_head_masks(evaluator: MaskEvaluator) -> dict[str, HeadMask]:
    """One mask per head, in layer-head order."""
    shape = (evaluator.n_layers, evaluator.n_heads)
    return {head_label(l_, h): HeadMask.from_heads([(l_, h)], shape)
            for l_ in range(evaluator.n_layers) for h in range(evaluator.n_heads)}


def scan_heads(evaluator: MaskEvaluator, out: RunFolder | None = None, checkpoint_every: int | None = None,
               max_top_k: int | None = None) -> ScanResult:
    """Ablate every head alone; then evaluate the top-k most harmful heads together for k = 1..max_top_k.

    Args:
        evaluator: scores masks on the search split.
        out: output folder: the scan is checkpointed there every ``checkpoint_every`` heads (default: one layer's
            worth) and resumed from it; ``scan.json`` and ``head_effects.png`` are written at the end.
        max_top_k: largest k for the top-k curve (default: the number of harmful heads, at most 2 layers' worth).
    """
    started = time.perf_counter()
    masks = single_head_masks(evaluator)
    state = (out.load_state(schema=ScanState) if out else None) or {"scores": {}}
    done: dict[str, float] = state["scores"]
    if set(done) - set(masks):
        raise out.damaged("state.json", f"scores of {sorted(set(done) - set(masks))[0]}, not a head of this model")
    for label, score in done.items():
        evaluator.remember(masks[label], score)
    step = checkpoint_every or evaluator.n_heads
    labels = list(masks)
    for i in range(0, len(labels), step):
        chunk = [label for label in labels[i:i + step] if label not in done]
        if not chunk:
            continue
        chunk_scores = evaluator.evaluate_many([masks[label] for label in chunk], desc="single-head scan")
        done.update(zip(chunk, chunk_scores, strict=True))
        if out is not None:
            out.save_state({"scores": done})
            out.write_history([{"head": label, "metric": done[label], "delta": done[label] - evaluator.baseline}
                               for label in labels if label in done])
        log.info("scan: %d/%d heads", len(done), len(labels))
    scores = torch.tensor([[done[head_label(l_, h)] for h in range(evaluator.n_heads)]
                           for l_ in range(evaluator.n_layers)])
    result = ScanResult(evaluator.baseline, scores, evaluator.objective.name, evaluator.operator.describe(),
                        evaluator.split)
    evaluate_top_k(result, evaluator, max_top_k)
    if out is not None and out.distributed.is_main:
        out.write_json("scan.json", {**result.to_dict(), "wall_seconds": time.perf_counter() - started})
        best = result.best_top_k()
        chosen = best["heads"] if best is not None and best["metric"] > result.baseline else []
        plots.plot_head_effects(result.delta, out.file("head_effects.png"),
                                title=f"Single-head ablation ({result.operator}) on {result.split or 'search split'}",
                                label=f"change of {result.metric} when ablated",
                                marked={f"best top-{len(chosen)}": chosen} if chosen else None)
    return result


def evaluate_top_k(scan: ScanResult, evaluator: MaskEvaluator, max_top_k: int | None = None) -> list[dict]:
    """Score the masks of the ``k`` most harmful heads of ``scan`` together, k = 1..max_top_k, with ``evaluator``
    (the real metric, also when ``scan`` is an estimate); stored in ``scan.top_k`` and returned.

    ``max_top_k`` defaults to the number of heads ranked harmful, at most two layers' worth.
    """
    n_top = max_top_k if max_top_k is not None else min(len(scan.harmful()), 2 * evaluator.n_heads)
    top_masks = [scan.top_k_mask(k) for k in range(1, n_top + 1)]
    scan.top_k = [{"k": k, "heads": scan.ranking()[:k], "metric": metric}
                  for k, metric in enumerate(evaluator.evaluate_many(top_masks, desc="scan top-k"), start=1)]
    return scan.top_k


def scan_search_result(scan: ScanResult, evaluator: MaskEvaluator, wall_seconds: float = 0.0,
                       strategy: str = "scan-top-k") -> SearchResult:
    """The best of the scan's top-k masks (scored by ``evaluator``) as a search result; the unablated model if none
    beats it."""
    best = scan.best_top_k()
    name = evaluator.objective.name
    if best is None or best["metric"] <= evaluator.baseline:
        mask, metric = HeadMask.ones(evaluator.backend), evaluator.baseline
    else:
        mask, metric = HeadMask.from_heads(best["heads"], evaluator.backend), best["metric"]
    return SearchResult(strategy, mask, name, evaluator.operator.describe(), 0.0, evaluator.split, metric,
                        evaluator.baseline, metric, evaluations=evaluator.n_forward_masks, wall_seconds=wall_seconds,
                        extra={"top_k": scan.top_k, "ranking": scan.ranking(),
                               "cache_plan": evaluator.plan.to_dict()})


# ----------------------------------------------------------------------------- layer scan
@dataclass
class LayerScanResult:
    """Metric with every head of each layer group cancelled; ``details`` holds task extras per group (e.g. the
    selected caption and every candidate's logits for caption selection)."""

    baseline: float
    groups: list[list[int]]
    scores: list[float]
    metric: str
    operator: str
    split: str = ""
    details: list[dict] | None = None
    baseline_details: dict | None = None
    generation: list[GroupCaptions] | None = None  # generated captions per group (``--generate``)
    baseline_generation: GroupCaptions | None = None
    generation_config: dict | None = None

    @property
    def labels(self) -> list[str]:
        return [layer_group_label(g) for g in self.groups]

    def to_dict(self) -> dict:
        rows = []
        for i, (label, score) in enumerate(zip(self.labels, self.scores, strict=True)):
            row = {"layers": label, "metric": score, "change": score - self.baseline}
            if self.details is not None:
                row["details"] = self.details[i]
            if self.generation is not None:
                row["generation"] = self.generation[i].to_dict()
            rows.append(row)
        data = {"metric": self.metric, "operator": self.operator, "split": self.split, "baseline": self.baseline,
                "baseline_details": self.baseline_details, "groups": rows}
        if self.generation is not None and self.baseline_generation is not None:
            data["generation_config"] = self.generation_config
            data["baseline_generation"] = self.baseline_generation.to_dict()
        return data


def scan_layers(evaluator: MaskEvaluator, ranges: str | Sequence[Sequence[int]] | None = None,
                details: Callable[[torch.Tensor], dict] | None = None, out: RunFolder | None = None,
                generate: LayerwiseCaptioning | None = None) -> LayerScanResult:
    """Cancel all heads of each layer (default) or of each layer range (``"0-2,3-5"``) with the evaluator's operator.

    Args:
        details: optional image features ``[N, D]`` -> dict of task extras, computed for the unablated model and
            every group (e.g. the caption-selection metric with the selected caption and candidate logits).
        out: writes ``layers.json`` and ``layer_scan.png``.
        generate: also generate a caption per image for the unablated model and every group, with the group
            cancelled in the captioner's encoder, continuing the selected caption (``details["selected"]``) if its
            config asks for it; scores under the unablated model. Runs on the main rank only.
    """
    if ranges is None:
        groups = [[layer] for layer in range(evaluator.n_layers)]
    elif isinstance(ranges, str):
        groups = parse_layer_ranges(ranges, evaluator.n_layers)
    else:
        groups = [parse_layers(g, evaluator.n_layers) for g in ranges]
    shape = (evaluator.n_layers, evaluator.n_heads)
    masks = [HeadMask.from_layers(group, shape) for group in groups]
    scores = evaluator.evaluate_many(masks, desc="layer scan")
    group_details = baseline_details = None
    if details is not None:
        group_details = [details(features) for features in evaluator.features_many(masks)]
        baseline_details = details(evaluator.baseline_features)
    result = LayerScanResult(evaluator.baseline, groups, scores, evaluator.objective.name,
                             evaluator.operator.describe(), evaluator.split, group_details, baseline_details)
    if generate is not None and (out is None or out.distributed.is_main):
        selected = None
        if group_details is not None and baseline_details is not None and "selected" in baseline_details:
            selected = [baseline_details["selected"], *[d["selected"] for d in group_details]]
        captions = generate([[], *groups], selected)
        result.baseline_generation, result.generation = captions[0], captions[1:]
        result.generation_config = generate.describe()
    if out is not None and out.distributed.is_main:
        out.write_json("layers.json", result.to_dict())
        plots.plot_layer_scan(result.labels, scores, result.baseline, out.file("layer_scan.png"), metric=result.metric,
                              title=f"Layer scan ({result.operator})")
    return result
