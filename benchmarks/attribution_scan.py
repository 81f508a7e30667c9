"""Exact single-head scan vs attribution scan on the bundled model and its world's val_ood split, in one run.

* exact: :func:`~clipheads.search.scan_heads` on a :class:`~clipheads.search.MaskEvaluator` scoring the real
  retrieval metric (mean recall) with every head ablated alone;
* attribution: :func:`~clipheads.search.attribution.attribution_scan`, every head's effect estimated from one forward
  pass and its backward passes of a smooth surrogate (default soft recall with the second-order term; first order
  alone and the contrastive loss are run too, for comparison).

Prints both times, the speed-up, the Spearman rank correlation of estimated vs exact per-head effects over all heads
and the overlap of the two top-10 harmful-head lists. The two scales differ (surrogate loss vs mean recall), so only
ranks are compared. Default: the whole val_ood split of the bundled world (1000 images, 2000 captions).

``--reliability`` also scans exactly the val_ood split of a world drawn with another seed (same model, fresh images)
and prints how well the exact scan's ranking agrees with itself on new images: the ceiling that a rank correlation
with one split's exact scan can be read against.

``--surrogate-scan`` also scans the soft-recall surrogate itself exactly (every head ablated alone), which separates
the two errors of the estimate: Taylor (estimate vs the surrogate's exact change) and surrogate (the surrogate's exact
change vs mean recall's).

``--arch ViT-B/32`` (or ViT-B/16, ViT-L/14) times both scans on a randomly initialised model of that architecture
(`transformers` CLIPModel, the world's images resized to 224 px): speed only, as the ratio depends on the number of
heads and layers; with random weights the rank correlations mean nothing and are not printed.

    python benchmarks/attribution_scan.py
    python benchmarks/attribution_scan.py --reliability --surrogate-scan
    python benchmarks/attribution_scan.py --arch ViT-B/32 --images 64
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time

import torch
from PIL import Image

import clipheads
from clipheads.eval.features import encode_texts
from clipheads.models.random_init import random_hf_clip
from clipheads.search import MaskEvaluator, Objective, ScanResult, retrieval_objective, scan_heads
from clipheads.search.attribution import attribution_scan, soft_recall_surrogate
from clipheads.search.verify import estimated_ranking, spearman
from clipheads.world import WorldSizes, make_world, read_split

VARIANTS = [("soft_recall", 2), ("soft_recall", 1), ("contrastive", 2), ("contrastive", 1)]  # (surrogate, order)
ORDERS = {1: "first order", 2: "second order"}


def load_val_ood(backend, n_images: int, folder: str, seed: int = 0) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Pixels ``[N, 3, H, W]``, every caption, and each caption's image index ``[N_txt]``."""
    sizes = WorldSizes(train=0, val_ood=n_images, test_ood=0, test_iid=0, test_anti=0, compositional=0,
                       counterfactual=0)
    paths = make_world(folder, seed=seed, sizes=sizes, progress=False)
    entries = read_split(paths.retrieval, "val_ood")
    pixels = torch.stack([backend.preprocess(Image.open(e["path"]).convert("RGB")) for e in entries])
    captions = [(s["raw"], i) for i, e in enumerate(entries) for s in e["sentences"]]
    return pixels, [c for c, _ in captions], torch.tensor([i for _, i in captions])


def timed_exact_scan(backend, pixels: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     op: str, batch_size: int) -> tuple[ScanResult, float, int]:
    """The exact scan from scratch (the evaluator caches its residual streams inside the timing), its seconds and
    the number of masks it evaluated."""
    started = time.perf_counter()
    evaluator = MaskEvaluator(backend, pixels, retrieval_objective(text_features, text_to_image), op,
                              batch_size=batch_size)
    scan = scan_heads(evaluator, max_top_k=0)
    return scan, time.perf_counter() - started, evaluator.n_forward_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="val_ood images (default 1000, the whole split)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--op", default="identity")
    parser.add_argument("--arch", default="bundled", choices=["bundled", "ViT-B/32", "ViT-B/16", "ViT-L/14"],
                        help="bundled model (default) or a random model of a real architecture (timing only)")
    parser.add_argument("--reliability", action="store_true",
                        help="also scan a world of another seed exactly: the exact ranking's agreement with itself")
    parser.add_argument("--surrogate-scan", action="store_true",
                        help="also scan the soft-recall surrogate exactly: Taylor error vs surrogate mismatch")
    parser.add_argument("--probes", type=int, default=None,
                        help="probe pairs of the second order (default: clipheads' default for the image count)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    random_weights = args.arch != "bundled"
    backend = (random_hf_clip(args.arch).to(args.device) if random_weights
               else clipheads.load("bundled", device=args.device))
    with tempfile.TemporaryDirectory() as folder:
        pixels, captions, text_to_image = load_val_ood(backend, args.images, folder)
    pixels, text_to_image = pixels.to(backend.device), text_to_image.to(backend.device)
    text_features = encode_texts(backend, captions).to(backend.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    print(f"{'random ' + args.arch if random_weights else 'bundled'} model: {backend.architecture.name}, "
          f"{backend.n_layers} layers x {backend.n_heads} heads; val_ood: {len(pixels)} images, {len(captions)} "
          f"captions; op {args.op}; device {backend.device}; torch threads {torch.get_num_threads()}; "
          f"{datetime.date.today()}, {device}")

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    # warm-up: the first backward of a process pays one-off set-up costs that would be charged to one surrogate
    attribution_scan(backend, pixels[:2], text_features[:4], text_to_image[:4].clamp(max=1), op=args.op)
    exact, exact_seconds, n_masks = timed_exact_scan(backend, pixels, text_features, text_to_image, args.op,
                                                     args.batch_size)
    sync()
    estimates, seconds = {}, {}
    variants = VARIANTS[:2] if random_weights else VARIANTS  # timing only: the surrogate hardly changes the time
    for surrogate, order in variants:
        started = time.perf_counter()
        estimates[surrogate, order] = attribution_scan(backend, pixels, text_features, text_to_image, op=args.op,
                                                       batch_size=args.batch_size, surrogate=surrogate, order=order,
                                                       probes=args.probes)
        sync()
        seconds[surrogate, order] = time.perf_counter() - started

    exact_delta = exact.delta.flatten().tolist()
    top_exact = exact.ranking()[:10]
    print(f"exact scan ({exact.metric}, vanilla {exact.baseline:.4f}): {exact_seconds:.1f} s ({n_masks} masks)")
    for (surrogate, order), estimate in estimates.items():
        estimated_delta = estimate.estimated_delta.flatten().tolist()
        top_estimate = estimated_ranking(estimate.estimated_delta)[:10]
        pairs = f" ({estimate.probes} probe pair{'s' if estimate.probes > 1 else ''})" if order == 2 else ""
        print(f"attribution scan, {surrogate} surrogate ({estimate.surrogate:.4f}), {ORDERS[order]}{pairs}: "
              f"{seconds[surrogate, order]:.1f} s")
        print(f"  speedup exact/attribution {exact_seconds / seconds[surrogate, order]:.1f}")
        if random_weights:
            continue
        print(f"  Spearman estimated vs exact per-head effects (all {len(exact_delta)} heads): "
              f"{spearman(estimated_delta, exact_delta):.3f}")
        print(f"  top-10 harmful overlap: {len(set(top_exact) & set(top_estimate))}/10: {', '.join(top_estimate)}")
    if random_weights:
        print("random weights: timing only (rank correlations not meaningful)")
        return
    print(f"exact top-10 harmful: {', '.join(top_exact)}; distinct exact values: {len(set(exact_delta))}; heads "
          f"harmful exactly: {len(exact.harmful())}")

    if args.surrogate_scan:
        objective = Objective(lambda f: float(soft_recall_surrogate(f.float(), text_features, text_to_image)),
                              "soft_recall")
        surrogate_exact = scan_heads(MaskEvaluator(backend, pixels, objective, args.op, batch_size=args.batch_size),
                                     max_top_k=0).delta.flatten().tolist()
        print("soft_recall surrogate scanned exactly:")
        for order in (2, 1):
            estimated = estimates["soft_recall", order].estimated_delta.flatten().tolist()
            print(f"  Spearman {ORDERS[order]} estimate vs the surrogate's exact change (Taylor error): "
                  f"{spearman(estimated, surrogate_exact):.3f}")
        print(f"  Spearman the surrogate's exact change vs mean recall's (surrogate mismatch): "
              f"{spearman(surrogate_exact, exact_delta):.3f}")

    if args.reliability:
        with tempfile.TemporaryDirectory() as folder:
            other_pixels, other_captions, other_index = load_val_ood(backend, args.images, folder, seed=1)
        other, _, _ = timed_exact_scan(backend, other_pixels.to(backend.device),
                                       encode_texts(backend, other_captions).to(backend.device),
                                       other_index.to(backend.device), args.op, args.batch_size)
        other_delta = other.delta.flatten().tolist()
        print(f"reliability: exact scan of {len(other_pixels)} fresh val_ood images (world seed 1, vanilla "
              f"{other.baseline:.4f})")
        print(f"  Spearman exact (this split) vs exact (fresh images): {spearman(exact_delta, other_delta):.3f}; "
              f"top-10 overlap {len(set(top_exact) & set(other.ranking()[:10]))}/10")
        for (surrogate, order), estimate in estimates.items():
            print(f"  Spearman {surrogate} {ORDERS[order]} estimate (this split) vs exact (fresh images): "
                  f"{spearman(estimate.estimated_delta.flatten().tolist(), other_delta):.3f}; top-10 overlap "
                  f"{len(set(estimated_ranking(estimate.estimated_delta)[:10]) & set(other.ranking()[:10]))}/10")


if __name__ == "__main__":
    main()
