"""Caption selection (pick the right caption among candidates) and compositional pairs (Cola style)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from clipheads.errors import DataError
from clipheads.metrics.retrieval import check_text_to_image


@dataclass
class CaptionSelectionResult:
    """``acc``: the top-scoring candidate is the answer. ``clip_score``: mean CLIPScore (100 x cosine, floored at 0)
    of the selected caption; ``cosine``: its mean raw cosine. ``logits[i]``: logit of every candidate of image i."""

    acc: float
    clip_score: float
    cosine: float
    predictions: list[int]
    logits: list[list[float]]
    skipped_images: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        return {"acc": self.acc, "clip_score": self.clip_score, "cosine": self.cosine}

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "n_images": len(self.predictions), "predictions": self.predictions,
                "logits": self.logits, "skipped_images": self.skipped_images}


def caption_selection_metrics(image_features: torch.Tensor, candidate_features: torch.Tensor,
                              candidate_image: Sequence[int] | torch.Tensor, answers: Sequence[int],
                              logit_scale: float = 100.0) -> CaptionSelectionResult:
    """Score the candidates of every image and select the best.

    Args:
        image_features: ``[N, D]`` normalised. candidate_features: ``[M, D]`` normalised, image by image.
        candidate_image: ``[M]`` index of the image each candidate belongs to (candidates of an image in order).
        answers: ``[N]`` index of the right candidate within its image's candidates.
        logit_scale: multiplies the cosines into logits (the model's ``logit_scale``).
    """
    index = check_text_to_image(candidate_image, len(candidate_features), len(image_features))
    if len(answers) != len(image_features):
        raise DataError(f"{len(image_features)} images but {len(answers)} answers")
    cosines = (candidate_features.float() * image_features.float()[index]).sum(-1)  # [M]
    correct, selected, logits, predictions = [], [], [], []
    for i, answer in enumerate(answers):
        own = cosines[index == i]
        if len(own) == 0:
            raise DataError(f"image {i} has no candidate captions")
        best = int(own.argmax())
        predictions.append(best)
        correct.append(best == int(answer))
        selected.append(float(own[best]))
        logits.append((logit_scale * own).tolist())
    n = len(answers)
    return CaptionSelectionResult(acc=sum(correct) / n, clip_score=sum(100 * max(c, 0.0) for c in selected) / n,
                                  cosine=sum(selected) / n, predictions=predictions, logits=logits)


@dataclass
class CompositionalResult:
    """Cola-style pairs: ``acc`` (both captions find their image and both images find their caption),
    ``image_acc`` (caption -> image, both right) and ``text_acc`` (image -> caption, both right)."""

    acc: float
    image_acc: float
    text_acc: float
    n_pairs: int
    skipped_images: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        return {"acc": self.acc, "image_acc": self.image_acc, "text_acc": self.text_acc}

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "n_pairs": self.n_pairs, "skipped_images": self.skipped_images}


def compositional_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> CompositionalResult:
    """Pair accuracy and per-direction accuracy; a tie counts as wrong.

    Args:
        image_features: ``[N, 2, D]`` normalised, images a and b of each pair.
        text_features: ``[N, 2, D]`` normalised, the caption that fits a and the one that fits b.
    """
    if image_features.shape[:2] != text_features.shape[:2] or image_features.shape[1] != 2:
        raise DataError(f"compositional features must both be [N, 2, D]; got {tuple(image_features.shape)} and "
                        f"{tuple(text_features.shape)}")
    s = image_features.float() @ text_features.float().transpose(1, 2)  # [N, image, caption]
    text_ok = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    image_ok = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    n = len(s)
    return CompositionalResult(acc=int((text_ok & image_ok).sum()) / n, image_acc=int(image_ok.sum()) / n,
                               text_acc=int(text_ok.sum()) / n, n_pairs=n)
