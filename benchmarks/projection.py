"""A projection (not a measurement) of the search's cost on 5000 images: a single-head scan and a 50x50 AAT-GA of
open_clip ViT-B/16, ViT-L/14 and ViT-H/14, in hours on one thread of this CPU, on one H100-class GPU and on 8 with
torchrun.

Measured here: the FLOPs of one image's forward through each vision tower (``torch.utils.flop_counter`` at batch
1: the three models built on the meta device, which has shapes and no weights; ViT-B/16 also counted on a random
model on the CPU, where the fused CPU attention kernel has no formula in the counter: that count lacks the attention
products q k^T and A v, which the meta device runs as counted ``bmm``), and the seconds per image-forward of random
ViT-B/16 and ViT-L/14 on this CPU (1 thread, ``--images`` images per forward, the faster of two forwards, in CPU
time of this process: on a machine shared with other jobs wall time is inflated by waiting for a core; both are
printed).

Projected from them (clipheads' evaluator: the residual stream entering every layer is cached once, a mask whose
first ablated layer is ``l`` re-runs layers ``l..L-1``):

* scan: the cache build (1 forward per image) + every head once: ``H x sum_l (L - l)`` block-forwards per image;
* 50x50 AAT-GA: the cache build + 50 generations x 50 masks, each counted from layer 0 (``L`` block-forwards; an upper
  bound: elites and repeated masks are memoised, masks starting later cost less). ``clipheads search``'s default
  ``--seed-from scan`` adds the scan's row.
* CPU hours: FLOPs / the FLOP rate measured here for that model (ViT-H/14: ViT-L/14's rate).
* GPU hours: FLOPs / (``--mfu`` x the H100 SXM's dense peak from NVIDIA's datasheet: 989 TFLOP/s bf16 tensor,
  67 TFLOP/s fp32; PyTorch runs fp32 matmuls in full fp32 unless TF32 is enabled). The utilisation (default 40%)
  is an assumption, not measured (no GPU here). 8 GPUs: images split over the ranks (``shard_images``), ideal 8x.

    OMP_NUM_THREADS=1 python benchmarks/projection.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

ARCHS = {"ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-H/14": "ViT-H-14"}
MEASURED = ("ViT-B/16", "ViT-L/14")  # timed on this CPU; ViT-H/14 takes ViT-L/14's FLOP rate
PEAK = {"bf16": 989e12, "fp32": 67e12}  # H100 SXM dense, NVIDIA datasheet
N_IMAGES, POPULATION, GENERATIONS = 5000, 50, 50


def count(visual: torch.nn.Module, device: str) -> tuple[float, float]:
    """(FLOPs of one image's forward, FLOPs of one residual block) of an open_clip vision tower at batch 1."""
    # autograd on: under no_grad nn.MultiheadAttention takes a fused kernel the counter has no formula for
    with FlopCounterMode(display=False) as counter:
        visual(torch.zeros(1, 3, 224, 224, device=device))
    per_module = counter.get_flop_counts()
    block = next(sum(v.values()) for k, v in per_module.items() if k.endswith("resblocks.0"))
    return float(counter.get_total_flops()), float(block)


def seconds_per_image(visual: torch.nn.Module, images: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per image of the faster of two forwards (CPU time: this process's, which a
    machine shared with other jobs inflates less than wall time)."""
    pixels = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(2):
            cpu, wall = time.process_time(), time.perf_counter()
            visual(pixels)
            times.append((time.process_time() - cpu, time.perf_counter() - wall))
    cpu, wall = min(times)
    return cpu / images, wall / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="images per timed CPU forward (default 2)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed sustained fraction of the GPU's peak")
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# PROJECTION from measured FLOPs and CPU seconds; {now:%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} thread(s), load average {load}, "
          f"torch {torch.__version__}, open_clip {open_clip.__version__}")
    rows, rate = [], None
    for name, arch in ARCHS.items():
        meta = open_clip.create_model(arch, pretrained=None, device="meta").visual.eval()
        flops, block = count(meta, "meta")
        n_layers, n_heads = len(meta.transformer.resblocks), meta.transformer.resblocks[0].attn.num_heads
        measured = ""
        if name in MEASURED:
            visual = open_clip.create_model(arch, pretrained=None).visual.eval()
            if name == "ViT-B/16":
                measured = f", random weights on CPU {count(visual, 'cpu')[0] / 1e9:.2f} (no attention products)"
            seconds, wall = seconds_per_image(visual, args.images)
            rate = flops / seconds
            del visual
            measured += (f"; CPU {seconds:.2f} s per image-forward ({rate / 1e9:.0f} GFLOP/s; wall {wall:.2f} s)")
        print(f"# {name}: {n_layers} layers x {n_heads} heads, {flops / 1e9:.2f} GFLOPs per image-forward (meta), "
              f"{block / 1e9:.2f} per block{measured}")
        scan = flops + n_heads * block * n_layers * (n_layers + 1) / 2
        ga = flops + POPULATION * GENERATIONS * n_layers * block
        rows.append((name, flops, scan, ga, rate))

    def hours(total: float, per_second: float) -> str:
        value = total * N_IMAGES / per_second / 3600
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2g}"

    gpu = {p: args.mfu * peak for p, peak in PEAK.items()}
    print(f"# GPU: {args.mfu:.0%} of H100 SXM dense peak = {gpu['bf16'] / 1e12:.0f} TFLOP/s bf16, "
          f"{gpu['fp32'] / 1e12:.1f} TFLOP/s fp32 (assumed); {args.gpus} GPUs = ideal {args.gpus}x")
    print(f"| model | search ({N_IMAGES} images) | image-forwards per image | CPU, 1 thread (h) | 1 GPU fp32 (h) | "
          f"1 GPU bf16 (h) | {args.gpus} GPUs fp32 (h) | {args.gpus} GPUs bf16 (h) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, flops, scan, ga, rate in rows:
        for label, total in (("single-head scan", scan), (f"AAT-GA {POPULATION}x{GENERATIONS}", ga)):
            print(f"| {name} | {label} | {total / flops:.0f} | {hours(total, rate)} | {hours(total, gpu['fp32'])} | "
                  f"{hours(total, gpu['bf16'])} | {hours(total, gpu['fp32'] * args.gpus)} | "
                  f"{hours(total, gpu['bf16'] * args.gpus)} |")

if __name__ == "__main__":
    main()
