"""Evaluation datasets in the formats users already have, and the image loader they stream through.

=============  ========================================================================  ==========================
task           formats                                                                   loader
=============  ========================================================================  ==========================
retrieval      Karpathy split JSON, COCO captions JSON, CSV/TSV image,caption,            ``load_retrieval``
               clip_benchmark Flickr txt, Hugging Face dataset (image + caption(s);
               also a Hub id, offline from the cache), webdataset shards (.tar, .tar.gz)
zeroshot       ImageFolder (ImageNet ``n01440764/`` get readable names), CSV/TSV          ``load_classification``
               image,label, flat ImageNet val folder + labels, Hugging Face dataset
               (image + ``ClassLabel``), webdataset shards (``.cls``, classnames.txt)
selection      JSON/CSV image + candidate captions + answer, SugarCrepe JSON             ``load_caption_selection``
compositional  JSON pairs of 2 images + 2 captions (Cola style), Winoground (HF)         ``load_compositional``
bias           JSON neutral queries + counterfactual image groups, Hugging Face dataset  ``load_counterfactual``
               in SocialCounterfactuals' columns (counterfactual_set, a1_type/a1, ...)
=============  ========================================================================  ==========================

What a path is (and so which reader reads it) is decided in one place, :func:`clipheads.data.sources.detect_source`.
Paths inside dataset files are relative to the file's folder. Images are files or :class:`ImageRef` (a tar member, a
Hugging Face dataset cell), read in DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clipheads.data.bias import CounterfactualDataset, load_counterfactual
from clipheads.data.classification import (
    DEFAULT_TEMPLATES,
    ClassificationDataset,
    load_classification,
    load_classnames,
    load_templates,
)
from clipheads.data.images import ImageFiles, ImageRef, PixelBatch, image_loader, iter_pixels, read_image
from clipheads.data.matching import (
    CaptionSelectionDataset,
    CompositionalDataset,
    load_caption_selection,
    load_compositional,
)
from clipheads.data.retrieval import RETRIEVAL_READERS, RetrievalDataset, load_retrieval
from clipheads.data.sources import detect_source
from clipheads.errors import DataError

LOADERS: dict[str, Callable] = {
    "retrieval": load_retrieval,
    "zeroshot": load_classification,
    "selection": load_caption_selection,
    "compositional": load_compositional,
    "bias": load_counterfactual,
}


def load_dataset(task: str, path: str | Path, **options):
    """The dataset of ``task`` (a key of :data:`LOADERS`, or clip_benchmark's name of one) read from ``path``;
    ``options`` go to its loader.

    Raises:
        DataError: the file is not a dataset of ``task`` (the message names the task: a command's default task may
            not be the one the user had in mind, e.g. ``layers`` reads caption selection).
    """
    from clipheads.eval.benchmark import task_name

    task = task_name(task, tuple(LOADERS))  # the one parser of task names (clip_benchmark's too)
    try:
        return LOADERS[task](path, **options)
    except DataError as exc:
        raise DataError(f"{exc} (read as a {task} dataset: --task {task})") from None


__all__ = ["DEFAULT_TEMPLATES", "LOADERS", "RETRIEVAL_READERS", "CaptionSelectionDataset", "ClassificationDataset",
           "CompositionalDataset", "CounterfactualDataset", "ImageFiles", "ImageRef", "PixelBatch", "RetrievalDataset",
           "detect_source", "image_loader", "iter_pixels", "load_caption_selection", "load_classification",
           "load_classnames", "load_compositional", "load_counterfactual", "load_dataset", "load_retrieval",
           "load_templates", "read_image"]
