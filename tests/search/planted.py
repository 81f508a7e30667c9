"""A tiny model with one planted harmful head, and the task on which it is harmful (shared by the search tests and
the torchrun worker: ``python -m torch.distributed.run --nproc_per_node 2 tests/search/planted.py OUT``).

The out_proj columns of head ``L1.H2`` are scaled up, so that this head's output swamps the image features. The
"captions" of the images are the features of the same model with that head cancelled (identity operator), centred
over the images: the planted head is the one whose ablation makes every image match its caption.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import clipheads
from clipheads.models.random_init import tiny_model
from clipheads.search import (
    BPConfig,
    Distributed,
    GAConfig,
    MaskEvaluator,
    Objective,
    RunFolder,
    bp_search,
    ga_search,
    scan_heads,
)

PLANTED = "L1.H2"


def planted_model(kind: str = "hf", seed: int = 0, strength: float = 8.0):
    backend = tiny_model(kind, seed=seed)
    layer, head = clipheads.parse_head(PLANTED)
    d = backend.head_dim
    with torch.no_grad():
        backend.out_proj(layer).weight[:, head * d:(head + 1) * d] *= strength
    return backend


def match_score(image_features: torch.Tensor, text_features: torch.Tensor, scale: float = 30.0) -> float:
    """Mean log-probability of the right caption for each image and the right image for each caption."""
    logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return float((logits.log_softmax(dim=1).diagonal().mean() + logits.log_softmax(dim=0).diagonal().mean()) / 2)


def planted_task(backend, n_images: int = 8, seed: int = 0):
    """``(pixels [N, 3, 32, 32], caption features [N, D], objective)`` for the planted model."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_images, 3, backend.image_size, backend.image_size, generator=generator)
    with torch.no_grad(), clipheads.ablate(backend, clipheads.HeadMask.from_heads(PLANTED, backend)):
        clean = backend.encode_image(pixels)
    captions = clean - clean.mean(dim=0)  # what tells the images apart
    return pixels, captions, Objective(lambda features: match_score(features, captions), "match")


def scan_and_ga(out: str, distributed: Distributed) -> dict:
    backend = planted_model()
    pixels, captions, objective = planted_task(backend)
    evaluator = MaskEvaluator(backend, pixels, objective, batch_size=16, distributed=distributed)
    scan = scan_heads(evaluator)
    config = GAConfig(beta=0.5, population=8, generations=3, seed=3)
    result = ga_search(evaluator, config, RunFolder(out, {"test": "distributed"}, distributed), scan=scan)
    # batches of 5 images: split 3 + 2 over two ranks
    bp = bp_search(evaluator, captions, torch.arange(len(pixels)), BPConfig(beta=0.1, epochs=2, batch_size=5, lr=0.5))
    return {"scores": scan.scores.tolist(), "mask": result.mask.ablated, "history": result.history,
            "evaluated_here": evaluator.n_local_masks, "evaluated": evaluator.n_forward_masks,
            "bp_gates": bp.gates.tolist(), "bp_mask": bp.mask.ablated, "bp_loss": [h["loss"] for h in bp.history]}


def sharded(out: str, distributed: Distributed) -> dict:
    """The scan, a short AAT-GA and layer features with every rank caching only its share of 9 images (5 + 4 on two
    ranks) under a budget that keeps every 2nd layer; rank 0's progress bars go to ``out/stderr-0.txt``."""
    backend = planted_model()
    pixels, captions, objective = planted_task(backend, n_images=9)
    with open(f"{out}/stderr-{distributed.rank}.txt", "w") as stderr:
        saved, sys.stderr = sys.stderr, stderr
        try:
            evaluator = MaskEvaluator(backend, pixels, objective, batch_size=4, distributed=distributed,
                                      shard_images=True, cache_stride=2, progress=True)
            scan = scan_heads(evaluator)
        finally:
            sys.stderr = saved
    result = ga_search(evaluator, GAConfig(beta=0.5, population=8, generations=2, seed=3), scan=scan)
    layers = evaluator.features_many([clipheads.HeadMask.from_heads([(layer, 0)], backend) for layer in range(2)])
    try:
        bp_search(evaluator, captions, torch.arange(len(pixels)), BPConfig(epochs=1, batch_size=4))
        bp = "ran"
    except clipheads.ClipHeadsError as error:
        bp = str(error)
    return {"scores": scan.scores.tolist(), "mask": result.mask.ablated, "history": result.history,
            "baseline": evaluator.baseline_features.tolist(), "layers": [f.tolist() for f in layers],
            "cached_rows": [len(evaluator.residual(layer)) for layer in evaluator.cached_layers],
            "n_cached": len(evaluator.cached_layers), "sharded": evaluator.sharded, "bp": bp}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist = Distributed.from_env()
    if sys.argv[2:] == ["sharded"]:
        summary = sharded(sys.argv[1], dist)
        with open(f"{sys.argv[1]}/result-{dist.rank}.json", "w") as handle:
            json.dump({"world_size": dist.world_size, **summary}, handle)
        sys.exit(0)
    summary = scan_and_ga(sys.argv[1], dist)
    if dist.is_main:
        with open(f"{sys.argv[1]}/result.json", "w") as handle:
            json.dump({"world_size": dist.world_size, **summary}, handle)
