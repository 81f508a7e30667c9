"""Single-head scan of a ViT-B/32-size model: clipheads' evaluator vs the naive method, in one run.

* naive: for every head, ablate it with a hook on the full model and re-encode every image (``clipheads.ablate`` +
  ``encode_image``), no caching;
* clipheads: :class:`~clipheads.search.MaskEvaluator` (residual stream cached once per layer, a head of layer ``l``
  recomputes layers ``l..``, several heads stacked in one batched forward) + :func:`~clipheads.search.scan_heads`.

Both score the same continuous objective of the image features (mean log-probability of each image's own random
"caption" vector), so agreement is checked on real numbers, not on a metric that saturates.

    python benchmarks/scan_speed.py --backend hf --images 8
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
import torch.nn.functional as F

import clipheads
from clipheads.models.random_init import random_hf_clip, random_open_clip
from clipheads.search import MaskEvaluator, Objective, scan_heads


def make_objective(captions: torch.Tensor) -> Objective:
    def score(features: torch.Tensor) -> float:
        logits = 10 * F.normalize(features.float(), dim=-1) @ F.normalize(captions, dim=-1).T
        return float(logits.log_softmax(dim=1).diagonal().mean())

    return Objective(score, "caption_log_prob")


def naive_scan(model, pixels: torch.Tensor, objective: Objective, batch_size: int, op: str) -> torch.Tensor:
    scores = torch.zeros(model.n_layers, model.n_heads)
    with torch.inference_mode():
        for layer in range(model.n_layers):
            for head in range(model.n_heads):
                with clipheads.ablate(model, clipheads.HeadMask.from_heads([(layer, head)], model), op=op):
                    features = torch.cat([model.encode_image(pixels[i:i + batch_size])
                                          for i in range(0, len(pixels), batch_size)])
                scores[layer, head] = objective(features)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["hf", "open_clip"], default="hf")
    parser.add_argument("--images", type=int, default=8, help="number of random images (default 8)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per forward (clipheads stacks heads)")
    parser.add_argument("--op", default="identity")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = (random_hf_clip("ViT-B/32") if args.backend == "hf" else random_open_clip("ViT-B-32")).to(args.device)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, model.image_size, model.image_size, generator=generator).to(args.device)
    with torch.inference_mode():
        dim = model.encode_image(pixels[:1]).shape[1]
    objective = make_objective(torch.randn(args.images, dim, generator=generator).to(args.device))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    sync()
    start = time.perf_counter()
    evaluator = MaskEvaluator(model, pixels, objective, op=args.op, batch_size=args.batch_size)
    fast = scan_heads(evaluator, max_top_k=0).scores
    sync()
    fast_seconds = time.perf_counter() - start

    start = time.perf_counter()
    naive = naive_scan(model, pixels, objective, args.batch_size, args.op)
    sync()
    naive_seconds = time.perf_counter() - start

    diff = float((fast - naive).abs().max())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# single-head scan ({args.op}), {args.backend} ViT-B/32 size, {args.images} images, "
          f"{model.n_layers * model.n_heads} heads, batch {args.batch_size} ({evaluator.masks_per_forward} heads per "
          f"forward), {datetime.date.today()}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"clipheads: {fast_seconds:.1f} s")
    print(f"naive:     {naive_seconds:.1f} s")
    print(f"speedup naive/clipheads {naive_seconds / fast_seconds:.1f}")
    print(f"{fast.numel()} results agree: {diff <= 1e-5} (max abs diff {diff:.2e})")


if __name__ == "__main__":
    main()
