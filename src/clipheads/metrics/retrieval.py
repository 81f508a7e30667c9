"""Image-text retrieval: recall@k both ways, as in CLIP papers and clip_benchmark (same keys, same conventions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clipheads.errors import DataError

RECALL_KS = (1, 5, 10)


@dataclass
class RetrievalResult:
    """Recall@k as fractions: ``image_retrieval_recall`` is text -> image, ``text_retrieval_recall`` image -> text."""

    image_retrieval_recall: dict[int, float]
    text_retrieval_recall: dict[int, float]
    n_images: int
    n_texts: int
    skipped_images: list[str] = field(default_factory=list)

    @property
    def mean_recall(self) -> float:
        """Mean of every recall (both directions, every k): "mean-R"."""
        values = [*self.image_retrieval_recall.values(), *self.text_retrieval_recall.values()]
        return sum(values) / len(values)

    @property
    def metrics(self) -> dict[str, float]:
        """``image_retrieval_recall@k``, ``text_retrieval_recall@k`` (clip_benchmark's keys) and ``mean_recall``."""
        out = {}
        for k in self.image_retrieval_recall:
            out[f"image_retrieval_recall@{k}"] = self.image_retrieval_recall[k]
            out[f"text_retrieval_recall@{k}"] = self.text_retrieval_recall[k]
        return {**out, "mean_recall": self.mean_recall}

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "n_images": self.n_images, "n_texts": self.n_texts,
                "skipped_images": self.skipped_images}


def check_text_to_image(text_to_image: Sequence[int] | torch.Tensor, n_texts: int, n_images: int) -> torch.Tensor:
    """``text_to_image`` as a LongTensor ``[N_txt]``, refused if it does not match the features."""
    index = torch.as_tensor(text_to_image, dtype=torch.long).flatten()
    if len(index) != n_texts:
        raise DataError(f"{n_texts} caption features but text_to_image has {len(index)} entries")
    outside = index[(index < 0) | (index >= n_images)]
    if len(outside):
        raise DataError(f"text_to_image points at image {int(outside[0])} but there are {n_images} images")
    return index


def captions_by_image(text_to_image: Sequence[int] | torch.Tensor, n_images: int) -> list[list[int]]:
    """The caption indices of every image (``[]`` for an image without captions), from ``text_to_image [N_txt]``."""
    captions: list[list[int]] = [[] for _ in range(n_images)]
    for caption, image in enumerate(torch.as_tensor(text_to_image, dtype=torch.long).tolist()):
        captions[image].append(caption)
    return captions


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: Sequence[int] | torch.Tensor, ks: Sequence[int] = RECALL_KS) -> RetrievalResult:
    """Recall@k of text -> image and image -> text retrieval.

    An image counts as retrieved for a caption if it is in the caption's top k; a caption set counts as retrieved
    for an image if any of the image's captions is in its top k (the CLIP-paper convention, which clip_benchmark
    computes as ``recall_at_k > 0``). ``k`` larger than the gallery is clipped to its size.

    Args:
        image_features: ``[N_img, D]``, L2-normalised (used as given).
        text_features: ``[N_txt, D]``, L2-normalised (used as given).
        text_to_image: ``[N_txt]`` index of each caption's image.
        ks: the k of recall@k.
    """
    n_images, n_texts = len(image_features), len(text_features)
    index = check_text_to_image(text_to_image, n_texts, n_images)
    scores = text_features.float() @ image_features.float().T  # [N_txt, N_img]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(n_texts), index] = True
    image_recall, text_recall = {}, {}
    for k in ks:
        top_images = scores.topk(min(k, n_images), dim=1).indices  # [N_txt, k]
        image_recall[k] = int(positive.gather(1, top_images).any(1).sum()) / n_texts  # exact fraction
        top_texts = scores.T.topk(min(k, n_texts), dim=1).indices  # [N_img, k]
        text_recall[k] = int(positive.T.gather(1, top_texts).any(1).sum()) / n_images
    return RetrievalResult(image_recall, text_recall, n_images, n_texts)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float | torch.Tensor
              ) -> torch.Tensor:
    """Symmetric CLIP contrastive loss (a scalar) of matched rows of ``[B, D]`` image and text features, which are
    L2-normalised first: open_clip's own :class:`open_clip.loss.ClipLoss` on one process (the AAT-BP search
    gathers its rows across ranks itself). ``logit_scale`` is the exponentiated scale (e.g. 100)."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), logit_scale)
