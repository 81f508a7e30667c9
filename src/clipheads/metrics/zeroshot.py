"""Zero-shot classification: class embeddings from prompt templates, top-k accuracy, per-class recall."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ZeroShotResult:
    """Accuracies as fractions (clip_benchmark's ``acc1``, ``acc5``, ``mean_per_class_recall``)."""

    acc1: float
    acc5: float
    mean_per_class_recall: float
    n_images: int
    per_class: dict[str, float] = field(default_factory=dict)  # class name -> top-1 recall, on request
    skipped_images: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        return {"acc1": self.acc1, "acc5": self.acc5, "mean_per_class_recall": self.mean_per_class_recall}

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "per_class": self.per_class, "n_images": self.n_images,
                "skipped_images": self.skipped_images}


def zeroshot_classifier(prompt_features: torch.Tensor) -> torch.Tensor:
    """Class embeddings ``[C, D]`` from prompt features ``[C, T, D]`` (C classes x T templates): the normalised
    mean of the normalised prompt embeddings, as in CLIP."""
    return F.normalize(F.normalize(prompt_features.float(), dim=-1).mean(dim=1), dim=-1)


def zeroshot_metrics(image_features: torch.Tensor, class_features: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                     classnames: Sequence[str] | None = None, per_class: bool = False) -> ZeroShotResult:
    """Top-1/top-5 accuracy and mean per-class recall, as Python floats of the exact fractions (12/60 -> 0.2).

    As in clip_benchmark, ``acc5`` is NaN when there are fewer than 5 classes (top-5 would be trivially 1.0);
    it is written as ``null`` in JSON.

    Args:
        image_features: ``[N, D]`` normalised. class_features: ``[C, D]`` from :func:`zeroshot_classifier`.
        labels: ``[N]`` true class of each image.
        classnames: names for ``per_class`` (default: the class index).
        per_class: also report the top-1 recall of every class that has images.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    logits = image_features.float() @ class_features.float().T  # [N, C]
    n_classes = logits.shape[1]
    top = logits.topk(min(5, n_classes), dim=1).indices  # [N, k]
    hits = top == labels[:, None]
    correct1 = hits[:, 0]
    present = labels.unique().tolist()
    recalls = {c: int(correct1[labels == c].sum()) / int((labels == c).sum()) for c in present}
    names = list(classnames) if classnames is not None else [str(c) for c in range(n_classes)]
    n = len(labels)
    acc5 = int(hits.any(1).sum()) / n if n_classes >= 5 else math.nan
    return ZeroShotResult(acc1=int(correct1.sum()) / n, acc5=acc5,
                          mean_per_class_recall=sum(recalls.values()) / len(recalls), n_images=n,
                          per_class={names[c]: r for c, r in recalls.items()} if per_class else {})
