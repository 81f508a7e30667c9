"""Inference overhead of head ablation: ViT-B/32-size model, same batch, vanilla vs 1, 12 and 144 heads ablated.

Runs alternate in one process: every round times, for each condition, a vanilla and an ablated forward back to back
(in alternating order), so that a busy machine slows both alike; the ratio of each pair is reported as
median [min, max] over the rounds.

    python benchmarks/overhead.py --backend hf --batch-size 16 --rounds 7
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import clipheads
from clipheads.models.random_init import random_hf_clip, random_open_clip

CONDITIONS = {
    "1 head": "L5.H3",
    "12 heads": ",".join(f"L{layer}.H{(layer * 5) % 12}" for layer in range(12)),  # one in every layer
    "144 heads": "all",
}


def build(backend: str, device: str):
    model = random_hf_clip("ViT-B/32") if backend == "hf" else random_open_clip("ViT-B-32")
    return model.to(device)


def timed(model, pixels, mask, op: str) -> float:
    sync = torch.cuda.synchronize if pixels.is_cuda else (lambda: None)
    with torch.inference_mode():
        if mask is None:
            sync()
            start = time.perf_counter()
            model.encode_image(pixels)
            sync()
            return time.perf_counter() - start
        with clipheads.ablate(model, mask, op=op):
            sync()
            start = time.perf_counter()
            model.encode_image(pixels)
            sync()
            return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["hf", "open_clip"], default="hf")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--op", default="identity")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = build(args.backend, args.device)
    pixels = torch.randn(args.batch_size, 3, 224, 224, device=args.device)
    masks = {name: (clipheads.HeadMask.from_layers(f"0-{model.n_layers - 1}", model) if spec == "all"
                    else clipheads.HeadMask.from_heads(spec, model)) for name, spec in CONDITIONS.items()}
    for _ in range(2):  # warm-up every path
        timed(model, pixels, None, args.op)
        for mask in masks.values():
            timed(model, pixels, mask, args.op)

    ratios: dict[str, list[float]] = {name: [] for name in masks}
    vanilla_times = []
    for round_index in range(args.rounds):
        for name, mask in masks.items():
            if round_index % 2:
                ablated, vanilla = timed(model, pixels, mask, args.op), timed(model, pixels, None, args.op)
            else:
                vanilla, ablated = timed(model, pixels, None, args.op), timed(model, pixels, mask, args.op)
            vanilla_times.append(vanilla)
            ratios[name].append(ablated / vanilla)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# overhead of head ablation ({args.op}), {args.backend} ViT-B/32 size, batch {args.batch_size}, "
          f"{args.rounds} alternating rounds, {datetime.date.today()}, {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"vanilla: median {statistics.median(vanilla_times) * 1000:.1f} ms per batch")
    for name, values in ratios.items():
        print(f"{name:>9}: ratio ablated/vanilla {statistics.median(values):.3f} "
              f"[min {min(values):.3f}, max {max(values):.3f}]")


if __name__ == "__main__":
    main()
