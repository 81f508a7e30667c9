"""Metrics as pure functions over features and score matrices; results are dataclasses with ``metrics`` (a flat
``{name: value}`` dict, clip_benchmark's key names) and ``to_dict``."""

from clipheads.metrics.bias import BiasResult, bias_metrics, max_skew
from clipheads.metrics.matching import (
    CaptionSelectionResult,
    CompositionalResult,
    caption_selection_metrics,
    compositional_metrics,
)
from clipheads.metrics.retrieval import RECALL_KS, RetrievalResult, retrieval_metrics
from clipheads.metrics.zeroshot import ZeroShotResult, zeroshot_classifier, zeroshot_metrics

__all__ = ["RECALL_KS", "BiasResult", "CaptionSelectionResult", "CompositionalResult", "RetrievalResult",
           "ZeroShotResult", "bias_metrics", "caption_selection_metrics", "compositional_metrics", "max_skew",
           "retrieval_metrics", "zeroshot_classifier", "zeroshot_metrics"]
