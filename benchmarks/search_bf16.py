"""The search in bf16 against fp32 on the bundled model: the same single-head scan (mean-R on the bundled world's
``val_ood`` images, identity operator) run in each precision, in one process.

Precisions are open_clip's words (:mod:`clipheads.precision`), as ``--precision`` of ``clipheads scan|search``:
``bf16`` (weights and inputs in bfloat16) and ``amp_bf16`` (fp32 weights, bfloat16 autocast). Each precision encodes
its own captions and images, builds its own cache and scans every head, as the command would. Printed per precision:
the unablated mean-R, the largest and mean absolute difference of the per-head scores from fp32's (in mean-R
points, percent), how many heads' scores differ at all, the heads found harmful (ablation raises mean-R): their
number, and the heads gained (+) and lost (-) against fp32's set, the top 5, the Spearman correlation of the
per-head gains, and the wall time of the cache build and scan.

    OMP_NUM_THREADS=1 python benchmarks/search_bf16.py                  # CPU, 300 images
    python benchmarks/search_bf16.py --device cuda                      # benchmarks/gpu.sh: the same on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

import clipheads
from clipheads.demo.data import load_retrieval_set
from clipheads.precision import parse_precision, use_precision
from clipheads.search import MaskEvaluator, retrieval_objective, scan_heads
from clipheads.world import WorldSizes, make_world


def scan(world: Path, name: str, n_images: int, device: str, batch_size: int):
    """The scan of ``name``'s precision: ``(ScanResult, seconds of cache build + scan)``."""
    precision = parse_precision(name)
    backend = clipheads.load("bundled", device=device, dtype=precision.weights)
    with use_precision(precision, device):
        data = load_retrieval_set(backend, world, "val_ood", limit=n_images)
        start = time.perf_counter()
        evaluator = MaskEvaluator(backend, data.pixels.to(device), retrieval_objective(data.text_features.to(device),
                                  data.text_to_image), batch_size=batch_size, split="val_ood")
        result = scan_heads(evaluator, max_top_k=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="val_ood images searched (default 300)")
    parser.add_argument("--precisions", default="bf16,amp_bf16", help="compared with fp32 (default bf16,amp_bf16)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world", type=Path, help="a world folder to reuse (default: a fresh one, deleted after)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# search in bf16 vs fp32: bundled model, single-head scan, mean-R on {args.images} val_ood images; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {device}, "
          f"{torch.get_num_threads()} threads, load average {load}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.world or Path(tmp) / "world"
        sizes = WorldSizes(train=0, val_ood=args.images, test_ood=0, test_iid=0, test_anti=0, compositional=0,
                           counterfactual=0)
        world = make_world(root, seed=0, progress=False, sizes=sizes).retrieval
        reference, seconds = scan(world, "fp32", args.images, args.device, args.batch_size)
        n_heads = reference.scores.numel()
        print(f"fp32      baseline mean-R {100 * reference.baseline:.2f}  harmful {len(reference.harmful())}"
              f"/{n_heads}  top5 {','.join(reference.ranking()[:5])}  scan {seconds:.1f} s")
        for name in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            result, seconds = scan(world, name, args.images, args.device, args.batch_size)
            diff = (result.scores - reference.scores).abs() * 100
            rho = spearmanr(result.delta.flatten().numpy(), reference.delta.flatten().numpy()).statistic
            gained = sorted(set(result.harmful()) - set(reference.harmful()))
            lost = sorted(set(reference.harmful()) - set(result.harmful()))
            same = "same set" if not gained and not lost else f"+{','.join(gained) or '-'} -{','.join(lost) or '-'}"
            print(f"{name:9s} baseline mean-R {100 * result.baseline:.2f} "
                  f"({100 * (result.baseline - reference.baseline):+.2f})"
                  f"  per-head score diff max {diff.max():.2f} mean {diff.mean():.3f} points,"
                  f" {int((diff > 0).sum())}/{n_heads} heads differ  harmful {len(result.harmful())}/{n_heads}"
                  f" ({same})  top5 {','.join(result.ranking()[:5])}"
                  f" (same: {result.ranking()[:5] == reference.ranking()[:5]})  Spearman {rho:.3f}"
                  f"  scan {seconds:.1f} s")


if __name__ == "__main__":
    main()
