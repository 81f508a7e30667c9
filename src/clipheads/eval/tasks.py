"""One plain function per task: ``evaluate_<task>(model, dataset, mask=None, op="identity", ...) -> <Task>Result``.

Each encodes what it needs through the feature cache (texts once, images once per mask and operator) and hands the
features to the pure metric functions of :mod:`clipheads.metrics`. ``options``/keyword overrides are the fields of
:class:`~clipheads.eval.features.EncodeOptions` (``batch_size``, ``num_workers``, ``precision``, ``skip_bad``,
``progress``, ``cache``). The model runs on its own device (``clipheads.load(..., device=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from clipheads.data import (
    CaptionSelectionDataset,
    ClassificationDataset,
    CompositionalDataset,
    CounterfactualDataset,
    RetrievalDataset,
)
from clipheads.errors import DataError
from clipheads.eval.features import EncodedImages, EncodeOptions, encode_images, encode_texts
from clipheads.interventions import HeadMask, Operator
from clipheads.metrics import (
    RECALL_KS,
    BiasResult,
    CaptionSelectionResult,
    CompositionalResult,
    RetrievalResult,
    ZeroShotResult,
    bias_metrics,
    caption_selection_metrics,
    compositional_metrics,
    retrieval_metrics,
    zeroshot_classifier,
    zeroshot_metrics,
)
from clipheads.metrics.bias import check_skew_k
from clipheads.models import CLIPBackend, as_backend

Model = CLIPBackend | nn.Module


def _new_positions(encoded: EncodedImages, n: int) -> torch.Tensor:
    """``[n]``: the row of each requested image in ``encoded.features``, -1 for a skipped image."""
    position = torch.full((n,), -1, dtype=torch.long)
    position[encoded.kept] = torch.arange(len(encoded.kept))
    return position


def evaluate_retrieval(model: Model, dataset: RetrievalDataset, mask: HeadMask | None = None,
                       op: str | Operator = "identity", *, alpha: float | None = None, ks: Sequence[int] = RECALL_KS,
                       options: EncodeOptions | None = None, **overrides) -> RetrievalResult:
    """Recall@k image -> text and text -> image, and mean-R; captions of skipped images are left out too."""
    backend = as_backend(model)
    opts = EncodeOptions.make(options, **overrides)
    images = encode_images(backend, dataset.image_paths, mask, op, alpha=alpha, options=opts)
    texts = encode_texts(backend, dataset.texts, options=opts)
    text_to_image = _new_positions(images, len(dataset))[torch.tensor(dataset.text_to_image)]
    keep = text_to_image >= 0
    result = retrieval_metrics(images.features, texts[keep], text_to_image[keep], ks)
    result.skipped_images = images.skipped
    return result


def evaluate_zeroshot(model: Model, dataset: ClassificationDataset, mask: HeadMask | None = None,
                      op: str | Operator = "identity", *, alpha: float | None = None, per_class: bool = False,
                      options: EncodeOptions | None = None, **overrides) -> ZeroShotResult:
    """Top-1/top-5 accuracy (and per-class recall on request) with prompt-ensembled class embeddings."""
    backend = as_backend(model)
    opts = EncodeOptions.make(options, **overrides)
    prompts = encode_texts(backend, dataset.prompts(), options=opts)
    classifier = zeroshot_classifier(prompts.view(len(dataset.classnames), len(dataset.templates), -1))
    images = encode_images(backend, dataset.image_paths, mask, op, alpha=alpha, options=opts)
    labels = torch.tensor(dataset.labels)[images.kept]
    result = zeroshot_metrics(images.features, classifier, labels, dataset.classnames, per_class=per_class)
    result.skipped_images = images.skipped
    return result


def evaluate_caption_selection(model: Model, dataset: CaptionSelectionDataset, mask: HeadMask | None = None,
                               op: str | Operator = "identity", *, alpha: float | None = None,
                               options: EncodeOptions | None = None, **overrides) -> CaptionSelectionResult:
    """Accuracy of picking the right caption, CLIPScore and cosine of the picked one, every candidate's logit."""
    backend = as_backend(model)
    opts = EncodeOptions.make(options, **overrides)
    images = encode_images(backend, dataset.image_paths, mask, op, alpha=alpha, options=opts)
    kept = images.kept.tolist()
    candidates = [c for i in kept for c in dataset.candidates[i]]
    candidate_image = [n for n, i in enumerate(kept) for _ in dataset.candidates[i]]
    texts = encode_texts(backend, candidates, options=opts)
    result = caption_selection_metrics(images.features, texts, candidate_image, [dataset.answers[i] for i in kept],
                                       logit_scale=backend.logit_scale)
    result.skipped_images = images.skipped
    return result


def evaluate_compositional(model: Model, dataset: CompositionalDataset, mask: HeadMask | None = None,
                           op: str | Operator = "identity", *, alpha: float | None = None,
                           options: EncodeOptions | None = None, **overrides) -> CompositionalResult:
    """Pair accuracy and per-direction accuracy; a pair with a skipped image is left out."""
    backend = as_backend(model)
    opts = EncodeOptions.make(options, **overrides)
    paths = [p for pair in dataset.image_pairs for p in pair]
    images = encode_images(backend, paths, mask, op, alpha=alpha, options=opts)
    position = _new_positions(images, len(paths)).view(-1, 2)  # [N, 2]
    pairs = (position >= 0).all(dim=1)
    if not pairs.any():
        raise DataError(f"{dataset.source}: no pair has two readable images")
    captions = [c for pair in dataset.caption_pairs for c in pair]
    texts = encode_texts(backend, captions, options=opts).view(len(dataset), 2, -1)  # [N, 2, D]
    result = compositional_metrics(images.features[position[pairs]], texts[pairs])
    result.skipped_images = images.skipped
    return result


def evaluate_bias(model: Model, dataset: CounterfactualDataset, mask: HeadMask | None = None,
                  op: str | Operator = "identity", *, alpha: float | None = None, k: int = 10,
                  options: EncodeOptions | None = None, **overrides) -> BiasResult:
    """MaxSkew@K of every attribute for the neutral queries (averaged over the queries).

    Raises:
        DataError: ``k`` above the number of images of an attribute, before any image is encoded (and again after
            ``skip_bad`` dropped images).
    """
    check_skew_k(k, {a: dataset.attributes.count(a) for a in set(dataset.attributes)}, dataset.source)
    backend = as_backend(model)
    opts = EncodeOptions.make(options, **overrides)
    images = encode_images(backend, dataset.image_paths, mask, op, alpha=alpha, options=opts)
    queries = encode_texts(backend, dataset.queries, options=opts)
    kept = images.kept.tolist()
    result = bias_metrics(queries, images.features, [dataset.attributes[i] for i in kept],
                          [dataset.values[i] for i in kept], k=k)
    result.skipped_images = images.skipped
    return result


EVALUATORS: dict[str, Callable] = {
    "retrieval": evaluate_retrieval,
    "zeroshot": evaluate_zeroshot,
    "selection": evaluate_caption_selection,
    "compositional": evaluate_compositional,
    "bias": evaluate_bias,
}


def evaluate(task: str, model: Model, dataset, mask: HeadMask | None = None, op: str | Operator = "identity",
             **kwargs):
    """Run a task by name (the keys of ``clipheads.data.LOADERS``, or clip_benchmark's name of one):
    ``EVALUATORS[task](model, dataset, mask, op)``."""
    from clipheads.eval.benchmark import task_name

    return EVALUATORS[task_name(task, tuple(EVALUATORS))](model, dataset, mask, op, **kwargs)
