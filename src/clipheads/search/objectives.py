"""What a search maximises: a metric of the ablated model's image features, with the text side cached.

An :class:`Objective` maps image features ``[N_img, D]`` to one float, higher is better. The text features are
computed once per search and held by the objective; the metric itself comes from :mod:`clipheads.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipheads.errors import ClipHeadsError
from clipheads.metrics import retrieval_metrics


@dataclass
class Objective:
    """``fn(image_features [N_img, D]) -> float`` (higher is better), named after the metric it computes."""

    fn: Callable[[torch.Tensor], float]
    name: str = "metric"

    def __call__(self, image_features: torch.Tensor) -> float:
        return float(self.fn(image_features))


def retrieval_objective(text_features: torch.Tensor, text_to_image: torch.Tensor, key: str = "mean_recall"
                        ) -> Objective:
    """Image-text retrieval metric (default mean-R, the mean of R@1/5/10 in both directions).

    Args:
        text_features: ``[N_txt, D]`` cached caption features.
        text_to_image: ``[N_txt]`` index of each caption's image.
        key: which metric of :func:`clipheads.metrics.retrieval_metrics` to maximise.
    """
    text_features = F.normalize(text_features.float(), dim=-1)
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)

    def score(image_features: torch.Tensor) -> float:
        image = F.normalize(image_features.float(), dim=-1).to(text_features.device)
        return float(metric_value(retrieval_metrics(image, text_features, text_to_image), key))

    return Objective(score, key)


def metric_value(result, key: str) -> float:
    """One metric of a metrics result (its ``metrics`` dict, e.g. ``mean_recall``, ``acc1``) or of a plain dict."""
    values = result.metrics if hasattr(result, "metrics") else dict(result)
    if key not in values:
        raise ClipHeadsError(f"unknown metric {key!r} for this task; choose one of {', '.join(sorted(values))}")
    return float(values[key])
