"""Inference overhead of head ablation: vanilla vs 1 head, one head per layer and every head ablated.

Models: a ViT-B/32-size CLIP (``--backend hf`` or ``open_clip``) or a SigLIP vision tower of the real ViT-B/16 or
so400m shape (``--backend siglip --arch ViT-B/16`` or ``SO400M/14-384``: transformers ``SiglipModel``, random weights,
attention-pooling head). Runs alternate in one process: every round times, for each condition, a vanilla and an
ablated forward back to back (in alternating order), so that a busy machine slows both alike; the ratio of each pair
is reported as median [min, max] over the rounds.

    python benchmarks/overhead.py --backend hf --batch-size 16 --rounds 7
    python benchmarks/overhead.py --backend siglip --arch ViT-B/16 --batch-size 8 --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import clipheads
from clipheads.models.random_init import random_hf_clip, random_open_clip, random_siglip


def conditions(model) -> dict[str, str]:
    """Head sets to ablate: one head, one head in every layer, every head."""
    layers, heads = model.n_layers, model.n_heads
    return {"1 head": f"L{min(5, layers - 1)}.H{min(3, heads - 1)}",
            f"{layers} heads": ",".join(f"L{layer}.H{(layer * 5) % heads}" for layer in range(layers)),
            f"{layers * heads} heads": "all"}


def build(backend: str, arch: str | None, device: str):
    if backend == "siglip":
        model = random_siglip(arch or "ViT-B/16")
    else:
        model = random_hf_clip(arch or "ViT-B/32") if backend == "hf" else random_open_clip(arch or "ViT-B-32")
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
    parser.add_argument("--backend", choices=["hf", "open_clip", "siglip"], default="hf")
    parser.add_argument("--arch", default=None, help="ViT-B/32 (hf), ViT-B-32 (open_clip), ViT-B/16 or "
                                                     "SO400M/14-384 (siglip): the default is the first of each")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--op", default="identity")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args.backend, args.arch, args.device)
    size = model.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, device=args.device)
    masks = {name: (clipheads.HeadMask.from_layers(f"0-{model.n_layers - 1}", model) if spec == "all"
                    else clipheads.HeadMask.from_heads(spec, model)) for name, spec in conditions(model).items()}
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
    shape = f"{model.n_layers}x{model.n_heads} heads, {size} px"
    print(f"# overhead of head ablation ({args.op}), {args.backend} {args.arch or model.name} ({shape}), batch "
          f"{args.batch_size}, {args.rounds} alternating rounds, {datetime.date.today()}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"vanilla: median {statistics.median(vanilla_times) * 1000:.1f} ms per batch")
    for name, values in ratios.items():
        print(f"{name:>9}: ratio ablated/vanilla {statistics.median(values):.3f} "
              f"[min {min(values):.3f}, max {max(values):.3f}]")


if __name__ == "__main__":
    main()
