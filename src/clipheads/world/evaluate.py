"""Held-out evaluation on the bundled world: retrieval mean-R and how often the model reads the planted cue.

Everything runs on cached features: images and texts are encoded once, metrics are functions of score matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from clipheads.eval.features import encode_pixel_batches, encode_text_batches
from clipheads.metrics import retrieval_metrics
from clipheads.models.base import CLIPBackend
from clipheads.world.grammar import positional_caption, shape_swapped_caption
from clipheads.world.make import HELD_OUT, generate_split, read_split
from clipheads.world.scene import SHAPES, Scene, WorldObject, render_scene

RECALL_KS = (1, 5, 10)


@dataclass
class WorldSample:
    """Images of one split with their captions and ground-truth scene metadata, ready to evaluate."""

    split: str
    images: list[Image.Image]
    captions: list[list[str]]
    first_shapes: list[str]
    cue_shapes: list[str]
    probe_captions: list[list[str]]  # per image: the full caption with the first shape set to each of SHAPES

    def __len__(self) -> int:
        return len(self.images)


def sample_from_generator(split: str, n: int, seed: int = 0) -> WorldSample:
    """The first ``n`` images of ``split`` of the world with ``seed``, rendered in memory."""
    scenes: list[Scene] = []
    captions: list[list[str]] = []
    for scene, caps in generate_split(split, n, seed):
        scenes.append(scene)
        captions.append(caps)
    return WorldSample(split, [render_scene(s) for s in scenes], captions, [s.first.shape for s in scenes],
                       [s.cue_shape for s in scenes], [[shape_swapped_caption(s, shape) for shape in SHAPES]
                                                       for s in scenes])


def sample_from_disk(retrieval_json, split: str, n: int | None = None) -> WorldSample:
    """Images of ``split`` read from a world written by :func:`clipheads.world.make_world`."""
    entries = read_split(retrieval_json, split)[:n]
    images, captions, probes = [], [], []
    for entry in entries:
        with Image.open(entry["path"]) as image:
            images.append(image.convert("RGB"))
        captions.append([s["raw"] for s in entry["sentences"]])
        objects = [WorldObject(o["shape"], o["colour"], o["size"], tuple(o["cell"])) for o in entry["scene"]["objects"]]
        probes.append([_caption_with_first_shape(objects, shape) for shape in SHAPES])
    meta = [e["scene"] for e in entries]
    return WorldSample(split, images, captions, [m["first_shape"] for m in meta], [m["cue_shape"] for m in meta],
                       probes)


def _caption_with_first_shape(objects: list[WorldObject], shape: str) -> str:
    scene = Scene((objects[0].replace(shape=shape), *objects[1:]), marker="black", background="plain", grey=128)
    return positional_caption(scene)


def encode_images(backend: CLIPBackend, images: Sequence[Image.Image], batch_size: int = 250) -> torch.Tensor:
    """``[N, D]`` L2-normalised image features through the backend's own preprocessing and encoder
    (:func:`clipheads.eval.features.encode_pixel_batches`, preprocessed ``batch_size`` images at a time)."""
    batches = (torch.stack([backend.preprocess(im) for im in images[start:start + batch_size]])
               for start in range(0, len(images), batch_size))
    return encode_pixel_batches(backend, batches, normalize=True)


@dataclass
class SplitResult:
    """Held-out numbers of one split: retrieval, and what the model reads as the first object's shape."""

    split: str
    n_images: int
    mean_recall: float  # percent, mean of R@1/5/10 in both directions
    retrieval: dict[str, float]
    shape_accuracy: float  # percent of images where the true caption beats the same caption with another shape
    cue_following: float  # percent, among images whose marker does not match: the marker's shape was chosen

    def to_dict(self) -> dict:
        return asdict(self)


def shape_probe(image_features: torch.Tensor, probe_features: torch.Tensor, first_shapes: Sequence[str],
                cue_shapes: Sequence[str]) -> tuple[float, float]:
    """Which shape does the model see first? Pick, per image, the best of its 6 shape-swapped captions.

    Args:
        image_features: ``[N, D]``. probe_features: ``[N * len(SHAPES), D]``, image-major.

    Returns:
        (shape accuracy, cue following) in percent; cue following is measured on images whose marker signals
        another shape than the true one (NaN if there are none).
    """
    n = len(first_shapes)
    scores = torch.einsum("nd,nsd->ns", image_features, probe_features.view(n, len(SHAPES), -1))
    predicted = [SHAPES[i] for i in scores.argmax(1).tolist()]
    accuracy = 100.0 * float(np.mean([p == t for p, t in zip(predicted, first_shapes, strict=True)]))
    mismatched = [(p, c) for p, t, c in zip(predicted, first_shapes, cue_shapes, strict=True) if c != t]
    following = 100.0 * float(np.mean([p == c for p, c in mismatched])) if mismatched else float("nan")
    return accuracy, following


def evaluate_sample(backend: CLIPBackend, sample: WorldSample) -> SplitResult:
    """Retrieval mean-R and the shape probe of one split (with whatever ablation is applied to ``backend``)."""
    image_features = encode_images(backend, sample.images)
    texts = [c for caps in sample.captions for c in caps]
    text_image = [i for i, caps in enumerate(sample.captions) for _ in caps]
    metrics = world_retrieval_metric(image_features, encode_text_batches(backend, texts), text_image)
    probe = encode_text_batches(backend, [c for caps in sample.probe_captions for c in caps])
    accuracy, following = shape_probe(image_features, probe, sample.first_shapes, sample.cue_shapes)
    return SplitResult(sample.split, len(sample), 100.0 * metrics["mean_recall"], metrics, accuracy, following)


def world_retrieval_metric(image_features: torch.Tensor, text_features: torch.Tensor,
                           text_image: Sequence[int]) -> dict[str, float]:
    """mean-R and recalls of the world splits, from :func:`clipheads.metrics.retrieval_metrics`."""
    return retrieval_metrics(image_features, text_features, torch.as_tensor(text_image)).metrics


def evaluate_world(backend: CLIPBackend, seed: int = 0, n_per_split: int = 1000,
                   splits: Sequence[str] = HELD_OUT, data: str | None = None) -> dict[str, SplitResult]:
    """Held-out results per split, on images read from ``data`` (a world folder) or regenerated from ``seed``."""
    results = {}
    for split in splits:
        sample = (sample_from_disk(data, split, n_per_split) if data is not None
                  else sample_from_generator(split, n_per_split, seed))
        results[split] = evaluate_sample(backend, sample)
    return results
