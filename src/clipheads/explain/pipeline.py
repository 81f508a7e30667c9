"""The explain pipeline in two calls: describe every head with TextSpan, then label it and score its CCS."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

from clipheads.errors import ClipHeadsError
from clipheads.eval.features import encode_text_batches
from clipheads.explain.concepts import CCSResult, concept_consistency
from clipheads.explain.decomposition import decompose
from clipheads.explain.judges import Judge
from clipheads.explain.pool import TextPool, default_pool, known_texts
from clipheads.explain.textspan import HeadMoments, TextSpanResult, describe_moments
from clipheads.models import CLIPBackend

logger = logging.getLogger(__name__)


def describe_model(model: CLIPBackend, batches: Iterable[torch.Tensor], pool: TextPool | None = None, k: int = 5,
                   layers: str | Sequence[int] | None = None, rank: int = 80,
                   pool_features: torch.Tensor | None = None, text_batch_size: int = 256) -> TextSpanResult:
    """TextSpan descriptions of the heads of ``layers`` (default: all) over an image set.

    Args:
        model: an unablated backend.
        batches: preprocessed images, an iterable of ``[B, 3, H, W]``; their contributions are reduced to each
            head's mean and covariance batch by batch (:class:`~clipheads.explain.textspan.HeadMoments`), so memory
            does not grow with the number of images.
        pool: texts to describe heads with (default: :func:`~clipheads.explain.pool.default_pool`).
        pool_features: ``[M, D]`` features of ``pool.texts``, if already computed (texts the model's tokenizer
            does not know are dropped first, see :func:`~clipheads.explain.pool.known_texts`).
    """
    pool = known_texts(model, pool or default_pool())
    moments, chosen = HeadMoments(), None
    for pixels in batches:  # one batch of contributions at a time: memory independent of the number of images
        part = decompose(model, pixels, layers)
        moments.update(part.heads.flatten(1, 2))  # [B, S*H, D]
        chosen = part.layers
    if chosen is None:
        raise ClipHeadsError("no image batches to decompose")
    logger.info("decomposed %d images into %d layers x %d heads", moments.n, len(chosen), model.n_heads)
    if pool_features is None or len(pool_features) != len(pool):
        pool_features = encode_text_batches(model, pool.texts, text_batch_size)
    meta = {"model": model.name, "texts": pool.source, "layers": chosen}
    return describe_moments(moments, chosen, model.n_heads, pool_features, pool.texts, k=k, rank=rank, meta=meta)


def score_heads(descriptions: TextSpanResult, judges: Judge | Sequence[Judge], shape: tuple[int, int],
                labeler: Judge | None = None, checkpoint=None,
                progress: Callable[[int, int], None] | None = None) -> CCSResult:
    """Label every described head and compute its CCS (see :func:`concept_consistency`)."""
    meta = {**descriptions.meta, "variance": {d.label: d.variance for d in descriptions.heads}}
    for judge in [judges] if isinstance(judges, Judge) else judges:
        calibration = getattr(judge, "calibration", None)
        if calibration is not None:
            meta.setdefault("calibration", {})[judge.name] = calibration.to_dict()
    return concept_consistency(descriptions.descriptions(), judges, shape, labeler=labeler, checkpoint=checkpoint,
                               progress=progress, meta=meta)
