"""The explain pipeline in two calls: describe every head with TextSpan, then label it and score its CCS."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

from clipheads.errors import ClipHeadsError
from clipheads.eval.features import encode_text_batches
from clipheads.explain.concepts import CCSResult, concept_consistency
from clipheads.explain.decomposition import _final_stage, check_convention, decompose, decompose_batches
from clipheads.explain.judges import Judge
from clipheads.explain.pool import TextPool, default_pool, known_texts
from clipheads.explain.textspan import HeadMoments, TextSpanResult, describe_heads, describe_heads_streamed
from clipheads.heads import parse_layers
from clipheads.models import CLIPBackend
from clipheads.search.memory import ExplainPlan, parse_size, plan_explain

logger = logging.getLogger(__name__)


def explain_plan(model: CLIPBackend, n_images: int, chunk: int, layers: str | Sequence[int] | None = None,
                 memory_budget: int | str | None = None) -> ExplainPlan:
    """How :func:`describe_model` holds the head contributions of ``n_images`` images decomposed ``chunk`` at a
    time under ``memory_budget`` (bytes or a size such as ``"2GiB"``; ``None``: all in memory), see
    :func:`~clipheads.search.memory.plan_explain`.

    Raises:
        ClipHeadsError: a bad size, or a budget too small for the moments and one image.
    """
    chosen = list(range(model.n_layers)) if layers is None else parse_layers(layers, model.n_layers)
    width = model.n_heads * model.head_dim
    pool = model.attention_pool()
    if pool is not None:  # an attention-pooling head (SigLIP): its output projection sets the embedding's size
        dim = int(pool.out_weight.shape[0] if pool.projection is None else pool.projection.shape[-1])
    else:
        _, projection, _ = _final_stage(model)
        dim = width if projection is None else int(projection.shape[-1])
    return plan_explain(n_images=n_images, chunk=chunk, n_layers=model.n_layers, n_heads=model.n_heads,
                        n_chosen=len(chosen), width=width, dim=dim,
                        budget=None if memory_budget is None else parse_size(memory_budget))


def describe_model(model: CLIPBackend, batches: Iterable[torch.Tensor], pool: TextPool | None = None, k: int = 5,
                   layers: str | Sequence[int] | None = None, rank: int = 80,
                   pool_features: torch.Tensor | None = None, text_batch_size: int = 256,
                   convention: str = "textspan", memory_budget: int | str | None = None,
                   n_images: int | None = None, plan: ExplainPlan | None = None) -> TextSpanResult:
    """TextSpan descriptions of the heads of ``layers`` (default: all) over an image set.

    Args:
        model: an unablated backend.
        batches: preprocessed images, an iterable of ``[B, 3, H, W]``.
        pool: texts to describe heads with (default: :func:`~clipheads.explain.pool.default_pool`).
        pool_features: ``[M, D]`` features of ``pool.texts``, if already computed (texts the model's tokenizer
            does not know are dropped first, see :func:`~clipheads.explain.pool.known_texts`).
        convention: how the decomposition places the layer norm's mean and the biases: ``textspan`` (default, as
            published) or ``centred`` (see :func:`~clipheads.explain.decomposition.decompose`).
        memory_budget: bytes (or a size such as ``"2GiB"``) for the head contributions; when every image's
            ``[N, S, H, D]`` contributions do not fit, they are streamed: decomposed in chunks, folded into each
            head's uncentred second moments (float64) and dropped (:func:`~clipheads.explain.textspan.
            describe_heads_streamed`: the same picks). Needs ``n_images`` when ``batches`` has no ``len``.
        n_images: the number of images in ``batches`` (for the plan). plan: an :class:`ExplainPlan` to use as it is.

    Raises:
        ClipHeadsError: a budget too small for the second moments and one image (before any image is decomposed).
    """
    check_convention(convention)
    if plan is None and memory_budget is not None:
        if n_images is None:
            if not isinstance(batches, Sequence | torch.Tensor):
                raise ClipHeadsError("describe_model with a memory budget needs n_images when the batches are an "
                                     "iterator")
            n_images = sum(len(batch) for batch in batches)
        plan = explain_plan(model, n_images, 32, layers, memory_budget)
    pool = known_texts(model, pool or default_pool())
    if plan is not None and plan.streamed:
        moments = None
        for batch in batches:
            for chunk in batch.split(plan.chunk):
                part = decompose(model, chunk, layers, convention)
                moments = moments or HeadMoments(part.layers, model.n_heads, part.heads.shape[-1])
                moments.add(part)
        if moments is None:
            raise ClipHeadsError("no image batches to decompose")
        chosen = moments.layers
    else:
        decomposition = decompose_batches(model, batches, layers, convention)
        logger.info("decomposed %d images into %d layers x %d heads", decomposition.n_images,
                    len(decomposition.layers), model.n_heads)
        chosen = decomposition.layers
    if pool_features is None or len(pool_features) != len(pool):
        pool_features = encode_text_batches(model, pool.texts, text_batch_size)
    meta = {"model": model.name, "texts": pool.source, "layers": chosen}
    if plan is not None:
        meta["memory_plan"] = plan.describe()
    if plan is not None and plan.streamed:
        return describe_heads_streamed(moments, pool_features, pool.texts, k=k, rank=rank, meta=meta)
    return describe_heads(decomposition, pool_features, pool.texts, k=k, rank=rank, meta=meta)


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
