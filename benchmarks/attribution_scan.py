"""Exact single-head scan vs attribution scan on the bundled model and its world's val_ood split, in one run.

* exact: :func:`~clipheads.search.scan_heads` on a :class:`~clipheads.search.MaskEvaluator` scoring the real
  retrieval metric (mean recall) with every head ablated alone;
* attribution: :func:`~clipheads.search.attribution.attribution_scan`, every head's effect estimated from one forward
  and one backward pass of a smooth surrogate (default soft recall; the contrastive loss is run too, for comparison).

Prints both times, the speed-up, the Spearman rank correlation of estimated vs exact per-head effects over all heads
and the overlap of the two top-10 harmful-head lists. The two scales differ (surrogate loss vs mean recall), so only
ranks are compared. Default: the whole val_ood split of the bundled world (1000 images, 2000 captions).

    python benchmarks/attribution_scan.py
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
from clipheads.search import MaskEvaluator, retrieval_objective, scan_heads
from clipheads.search.attribution import attribution_scan
from clipheads.search.verify import estimated_ranking, spearman
from clipheads.world import WorldSizes, make_world, read_split


def load_val_ood(backend, n_images: int, folder: str) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Pixels ``[N, 3, H, W]``, every caption, and each caption's image index ``[N_txt]``."""
    sizes = WorldSizes(train=0, val_ood=n_images, test_ood=0, test_iid=0, test_anti=0, compositional=0,
                       counterfactual=0)
    paths = make_world(folder, seed=0, sizes=sizes, progress=False)
    entries = read_split(paths.retrieval, "val_ood")
    pixels = torch.stack([backend.preprocess(Image.open(e["path"]).convert("RGB")) for e in entries])
    captions = [(s["raw"], i) for i, e in enumerate(entries) for s in e["sentences"]]
    return pixels, [c for c, _ in captions], torch.tensor([i for _, i in captions])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="val_ood images (default 1000, the whole split)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--op", default="identity")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    backend = clipheads.load("bundled", device=args.device)
    with tempfile.TemporaryDirectory() as folder:
        pixels, captions, text_to_image = load_val_ood(backend, args.images, folder)
    pixels = pixels.to(backend.device)
    with torch.no_grad():
        text_features = torch.cat([backend.encode_text(captions[i:i + args.batch_size])
                                   for i in range(0, len(captions), args.batch_size)])
    print(f"bundled model: {backend.architecture.name}, {backend.n_layers} layers x {backend.n_heads} heads; "
          f"val_ood: {len(pixels)} images, {len(captions)} captions; op {args.op}; device {backend.device}; "
          f"torch threads {torch.get_num_threads()}; {datetime.date.today()}, {platform.machine()}")

    started = time.perf_counter()
    evaluator = MaskEvaluator(backend, pixels, retrieval_objective(text_features, text_to_image), args.op,
                              batch_size=args.batch_size)
    exact = scan_heads(evaluator, max_top_k=0)
    exact_seconds = time.perf_counter() - started

    estimates, seconds = {}, {}
    for surrogate in ("soft_recall", "contrastive"):
        started = time.perf_counter()
        estimates[surrogate] = attribution_scan(backend, pixels, text_features, text_to_image, op=args.op,
                                                batch_size=args.batch_size, surrogate=surrogate)
        seconds[surrogate] = time.perf_counter() - started

    exact_delta = exact.delta.flatten().tolist()
    top_exact = exact.ranking()[:10]
    print(f"exact scan ({exact.metric}, vanilla {exact.baseline:.4f}): {exact_seconds:.1f} s "
          f"({evaluator.n_forward_masks} masks)")
    for surrogate, estimate in estimates.items():
        estimated_delta = estimate.estimated_delta.flatten().tolist()
        top_estimate = estimated_ranking(estimate.estimated_delta)[:10]
        print(f"attribution scan, {surrogate} surrogate ({estimate.surrogate:.4f}): {seconds[surrogate]:.1f} s")
        print(f"  speedup exact/attribution {exact_seconds / seconds[surrogate]:.1f}")
        print(f"  Spearman estimated vs exact per-head effects (all {len(exact_delta)} heads): "
              f"{spearman(estimated_delta, exact_delta):.3f}")
        print(f"  top-10 harmful overlap: {len(set(top_exact) & set(top_estimate))}/10: {', '.join(top_estimate)}")
    print(f"exact top-10 harmful: {', '.join(top_exact)}; distinct exact values: {len(set(exact_delta))}; heads "
          f"harmful exactly: {len(exact.harmful())}")


if __name__ == "__main__":
    main()
