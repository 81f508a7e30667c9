"""A dataset split made ready for a search: images preprocessed in memory, text features encoded once, the objective.

Tasks: ``retrieval`` (default metric ``mean_recall``), ``selection`` (caption selection, ``acc``; the layer scan
also reports the selected caption and every candidate's logits) and ``zeroshot`` (``acc1``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from clipheads.data import image_loader, iter_pixels, load_dataset  # load_dataset: errors name the task
from clipheads.errors import ClipHeadsError, DataError
from clipheads.eval import encode_texts
from clipheads.metrics import caption_selection_metrics, zeroshot_classifier, zeroshot_metrics
from clipheads.models import CLIPBackend
from clipheads.search.objectives import Objective, metric_value, retrieval_objective

TASKS = ("retrieval", "selection", "zeroshot")
DEFAULT_METRICS = {"retrieval": "mean_recall", "selection": "acc", "zeroshot": "acc1"}


@dataclass
class SearchData:
    """One split: ``pixels [N, 3, H, W]``, the ``objective`` over their features, and for AAT-BP the image-text
    ``pairs`` (text features ``[N_txt, D]``, image index ``[N_txt]``). ``details`` gives task extras per mask."""

    split: str
    pixels: torch.Tensor
    objective: Objective
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    details: Callable[[torch.Tensor], dict] | None = None
    skipped: list[str] = field(default_factory=list)
    source: str = ""


def load_pixels(backend: CLIPBackend, paths: list[Path], batch_size: int = 64, num_workers: int = 0,
                skip_bad: bool = False, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Preprocessed pixels of the readable images ``[N_kept, 3, H, W]``, their positions ``[N_kept]``, skipped files."""
    skipped: list[str] = []
    chunks, kept = [], []
    for batch in iter_pixels(image_loader(paths, backend.preprocess, batch_size, num_workers), skip_bad, skipped,
                             progress):
        chunks.append(batch.pixels)
        kept.append(batch.indices)
    if not chunks:
        raise DataError(f"none of the {len(paths)} images could be read (first: {str(paths[0])!r})")
    return torch.cat(chunks), torch.cat(kept), skipped


def split_label(path: str | os.PathLike, split: str | None) -> str:
    """How a split is named in results: ``dataset_coco.json:val`` for a file with splits, else the file's name."""
    return f"{Path(path).name}:{split}" if split else Path(path).name


def split_options(task: str, path: str | os.PathLike, split: str | None) -> dict:
    """The ``split`` keyword of ``task``'s loader for ``path``: retrieval files carry splits (Karpathy JSON, a CSV's
    split column); zero-shot data only where the source holds them (a Hugging Face ``DatasetDict`` or ``split``
    column, clip_benchmark's ``{split}/`` shards); ``{}`` where the data have none."""
    from clipheads.data.sources import detect_source

    if task == "retrieval" or task == "zeroshot" and split is not None and detect_source(path, split) in SPLIT_SOURCES:
        return {"split": split}
    return {}


def column_options(task: str, columns: dict | None) -> dict:
    """The Hugging Face column names (``image_column``, ``text_column``, ``label_column``) that ``task``'s loader
    takes, of those given (``None`` values dropped)."""
    takes = {"retrieval": ("image_column", "text_column"), "zeroshot": ("image_column", "label_column")}.get(task, ())
    return {k: v for k, v in (columns or {}).items() if k in takes and v is not None}


#: sources whose splits are in the data's structure (read per split; reading them whole is refused or mixes splits)
SPLIT_SOURCES = ("hf", "hub", "wds")


def load_search_data(backend: CLIPBackend, task: str, path: str | os.PathLike, split: str | None = None, *,
                     metric: str | None = None, templates: str | None = None, batch_size: int = 64,
                     num_workers: int = 0, skip_bad: bool = False, progress: bool = False,
                     pixel_storage: str = "float32", columns: dict | None = None) -> SearchData:
    """Read ``path`` (``split`` for files with splits), preprocess its images and encode its texts once.

    ``columns``: Hugging Face column names (``image_column``, ``text_column``, ``label_column``: :func:`column_options`
    keeps those of ``task``).

    ``pixel_storage``: ``float32`` (a tensor), or ``uint8`` / ``disk`` (a :class:`~clipheads.search.pixels.PixelStore`
    giving the same floats to the last bit, see :mod:`clipheads.search.pixels`).
    """
    read = load_pixels
    if pixel_storage != "float32":
        from clipheads.search.pixels import load_pixel_store

        def read(backend, paths, batch_size, num_workers, skip_bad, progress):
            return load_pixel_store(backend, paths, pixel_storage, batch_size, num_workers, skip_bad, progress)
    if task not in TASKS:
        raise ClipHeadsError(f"the search supports the tasks {', '.join(TASKS)}; got {task!r}")
    metric = metric or DEFAULT_METRICS[task]
    label = split_label(path, split_options(task, path, split).get("split"))
    encode = {"batch_size": batch_size, "progress": progress}
    if task == "retrieval":
        dataset = load_dataset(task, path, split=split, **column_options(task, columns))
        pixels, kept, skipped = read(backend, dataset.image_paths, batch_size, num_workers, skip_bad, progress)
        position = torch.full((len(dataset),), -1, dtype=torch.long)
        position[kept] = torch.arange(len(kept))
        text_to_image = position[torch.tensor(dataset.text_to_image)]
        keep = text_to_image >= 0
        texts = encode_texts(backend, dataset.texts, **encode)[keep]
        return SearchData(label, pixels, retrieval_objective(texts, text_to_image[keep], metric),
                          (texts, text_to_image[keep]), skipped=skipped, source=str(path))
    if task == "selection":
        dataset = load_dataset(task, path)
        pixels, kept, skipped = read(backend, dataset.image_paths, batch_size, num_workers, skip_bad, progress)
        kept_list = kept.tolist()
        candidates = [c for i in kept_list for c in dataset.candidates[i]]
        candidate_image = torch.tensor([n for n, i in enumerate(kept_list) for _ in dataset.candidates[i]])
        answers = [dataset.answers[i] for i in kept_list]
        features = encode_texts(backend, candidates, **encode)
        offsets = [0]
        for i in kept_list:
            offsets.append(offsets[-1] + len(dataset.candidates[i]))

        def selection(image_features: torch.Tensor):
            image = F.normalize(image_features.float(), dim=-1).cpu()
            return caption_selection_metrics(image, features, candidate_image, answers, backend.logit_scale)

        def details(image_features: torch.Tensor) -> dict:
            result = selection(image_features)
            return {**result.metrics, "selected": [dataset.candidates[i][p] for i, p in
                                                   zip(kept_list, result.predictions, strict=True)],
                    "predictions": result.predictions, "logits": result.logits}

        right = features[torch.tensor([offsets[n] + a for n, a in enumerate(answers)])]
        return SearchData(label, pixels, Objective(lambda f: metric_value(selection(f), metric), metric),
                          (right, torch.arange(len(kept_list))), details, skipped, str(path))
    dataset = load_dataset(task, path, templates=templates, **split_options(task, path, split),
                           **column_options(task, columns))
    pixels, kept, skipped = read(backend, dataset.image_paths, batch_size, num_workers, skip_bad, progress)
    prompts = encode_texts(backend, dataset.prompts(), **encode)
    classifier = zeroshot_classifier(prompts.view(len(dataset.classnames), len(dataset.templates), -1))
    labels = torch.tensor(dataset.labels)[kept]

    def zeroshot(image_features: torch.Tensor) -> float:
        image = F.normalize(image_features.float(), dim=-1).cpu()
        return metric_value(zeroshot_metrics(image, classifier, labels, dataset.classnames).metrics, metric)

    return SearchData(label, pixels, Objective(zeroshot, metric), None, None, skipped, str(path))


def dataset_key(task: str, path: str | os.PathLike, templates: str | os.PathLike | None = None,
                splits: tuple[str | None, ...] = (), columns: dict | None = None):
    """The :class:`~clipheads.runkey.DatasetKey` of a task's dataset file: its sha256 and every image it lists (all
    splits; stats only, no image is read). Sources whose splits are in their structure (:data:`SPLIT_SOURCES`: a
    Hugging Face ``DatasetDict``, ``{split}/`` shards) are keyed by the images of ``splits``, the ones the run reads.
    Raises :class:`DataError` for files the task cannot read."""
    from clipheads.data.sources import detect_source
    from clipheads.runkey import DatasetKey

    if task not in TASKS:
        raise ClipHeadsError(f"the search supports the tasks {', '.join(TASKS)}; got {task!r}")
    options = {**({"templates": templates} if task == "zeroshot" else {}), **column_options(task, columns)}
    read = [s for s in dict.fromkeys(splits) if s is not None and task in ("retrieval", "zeroshot")
            and detect_source(path, s) in SPLIT_SOURCES]
    if not read:
        return DatasetKey.of(path, load_dataset(task, path, **options).image_paths)
    return DatasetKey.of(path, [image for split in read
                                for image in load_dataset(task, path, split=split, **options).image_paths])
