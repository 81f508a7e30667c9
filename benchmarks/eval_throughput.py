"""Retrieval evaluation by clipheads and by clip_benchmark on the same model and data, in one run.

    python benchmarks/eval_throughput.py --n-images 64 --batch-size 32

Writes a small synthetic retrieval set (PIL images + a Karpathy JSON) to a temp folder and evaluates a random
ViT-B/32 (open_clip) with both tools at fp32, with the same DataLoader settings and the same preprocessing:

1. one evaluation of the model as it is;
2. a sweep: the model as it is plus ``--n-masks`` head masks (clip_benchmark runs under ``clipheads.ablate``,
   which hooks the open_clip model it calls), where clipheads reuses the text features it already has.

Prints wall times, ``ratio clip_benchmark/clipheads`` (> 1: clipheads is faster) and both metric sets.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, default_collate

import clipheads
from clipheads.data import load_retrieval
from clipheads.eval import FeatureCache, evaluate_retrieval
from clipheads.models.random_init import random_open_clip

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square")
KS = (1, 5, 10)


def make_dataset(root: Path, n_images: int, captions_per_image: int, seed: int = 0) -> Path:
    """Random scenes of coloured shapes, captions that describe them, as a Karpathy split file."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_images):
        background, colour = rng.sample(list(COLOURS), 2)
        shape, size = rng.choice(SHAPES), rng.choice(("small", "large"))
        image = Image.new("RGB", (256, 256), COLOURS[background])
        r = 40 if size == "small" else 90
        x, y = rng.randint(r, 256 - r), rng.randint(r, 256 - r)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        image.save(root / "images" / f"{i:05d}.png")
        # the position makes every caption unique, so that no tool gains from encoding repeated captions once
        captions = [f"a {size} {colour} {shape} on {background} at {x} {y}",
                    f"a photo of a {colour} {shape} at {x} {y}",
                    f"{background} picture with a {size} {shape} at {x} {y}",
                    f"one {colour} {shape} number {i}",
                    f"a {shape} that is {colour} and {size}, at {x} {y}"]
        entries.append({"filename": f"{i:05d}.png", "filepath": "images", "split": "test", "imgid": i,
                        "sentences": [{"raw": c} for c in captions[:captions_per_image]]})
    path = root / "dataset.json"
    path.write_text(json.dumps({"dataset": "synthetic", "images": entries}))
    return path


class CaptionedImages(Dataset):
    """``(pixels, [captions])`` pairs, the item shape clip_benchmark's retrieval evaluation expects."""

    def __init__(self, dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with Image.open(self.dataset.image_paths[i]) as image:
            return self.transform(image.convert("RGB")), self.dataset.captions[i]


def image_captions_collate_fn(batch):
    """clip_benchmark.datasets.builder.image_captions_collate_fn (that module imports ``requests`` at import time)."""
    images, texts = list(zip(*batch, strict=True))
    return default_collate(images), texts


def run_clip_benchmark(backend, dataset, batch_size: int, num_workers: int) -> tuple[dict, float]:
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate

    loader = DataLoader(CaptionedImages(dataset, backend.preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=image_captions_collate_fn)
    start = time.perf_counter()
    metrics = evaluate(backend.model, loader, backend._tokenizer, "cpu", amp=False, recall_k_list=list(KS))
    seconds = time.perf_counter() - start
    return {**metrics, "mean_recall": sum(metrics.values()) / len(metrics)}, seconds


def run_clipheads(backend, dataset, batch_size: int, num_workers: int, mask, cache: FeatureCache
                  ) -> tuple[dict, float]:
    start = time.perf_counter()
    result = evaluate_retrieval(backend, dataset, mask=mask, op="zero", batch_size=batch_size,
                                num_workers=num_workers, cache=cache)
    return result.metrics, time.perf_counter() - start


def print_metrics(title: str, ours: dict, theirs: dict) -> bool:
    print(f"{title}\n  {'metric':28s} {'clipheads':>10s} {'clip_benchmark':>15s}")
    for key in theirs:
        print(f"  {key:28s} {ours[key]:10.4f} {theirs[key]:15.4f}")
    same = all(abs(ours[k] - theirs[k]) < 1e-6 for k in theirs)
    print(f"  identical metrics: {same}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--captions-per-image", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of the single evaluation, alternating tools")
    parser.add_argument("--n-masks", type=int, default=2, help="masks in the sweep (besides the unablated model)")
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.n_images < max(KS):
        parser.error(f"--n-images must be at least {max(KS)} (clip_benchmark's recall@k needs k <= images)")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random weights are random

    backend = random_open_clip(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = load_retrieval(make_dataset(Path(tmp), args.n_images, args.captions_per_image), split="test")
        print(f"{args.arch} (random), {len(dataset)} images, {len(dataset.texts)} captions "
              f"({len(set(dataset.texts))} unique), batch {args.batch_size}, "
              f"{args.num_workers} workers, {torch.get_num_threads()} threads, fp32")
        with torch.inference_mode():  # warm up both paths once
            backend.encode_image(torch.stack([backend.preprocess(Image.new("RGB", (64, 64)))]))
            backend.encode_text(["warm up"])
        loader = (args.batch_size, args.num_workers)

        # the machine may be shared: alternate the tools and keep each one's fastest run
        t_ours = t_theirs = float("inf")
        for repeat in range(args.repeats):
            for tool in ("clip_benchmark", "clipheads") if repeat % 2 == 0 else ("clipheads", "clip_benchmark"):
                if tool == "clipheads":
                    ours, seconds = run_clipheads(backend, dataset, *loader, None, FeatureCache())
                    t_ours = min(t_ours, seconds)
                else:
                    theirs, seconds = run_clip_benchmark(backend, dataset, *loader)
                    t_theirs = min(t_theirs, seconds)
        print(f"\n1) one evaluation (fastest of {args.repeats})\n"
              f"  clipheads       {t_ours:8.2f} s\n  clip_benchmark  {t_theirs:8.2f} s\n"
              f"  ratio clip_benchmark/clipheads = {t_theirs / t_ours:.2f}")
        same = print_metrics("  metrics (unablated model):", ours, theirs)

        rng = torch.Generator().manual_seed(0)
        masks = [None] + [clipheads.HeadMask.from_tensor((torch.rand(backend.n_layers, backend.n_heads,
                                                                     generator=rng) > 0.2).float(), backend)
                          for _ in range(args.n_masks)]
        cache, t_ours, t_theirs = FeatureCache(), 0.0, 0.0
        for n, mask in enumerate(masks):
            ours, seconds = run_clipheads(backend, dataset, *loader, mask, cache)
            t_ours += seconds
            if mask is None:
                theirs, seconds = run_clip_benchmark(backend, dataset, *loader)
            else:
                with clipheads.ablate(backend, mask, op="zero"):
                    theirs, seconds = run_clip_benchmark(backend, dataset, *loader)
            t_theirs += seconds
            ablated = f"{mask.n_ablated} heads zeroed" if mask is not None else "unablated"
            same &= print_metrics(f"  sweep run {n} ({ablated}):", ours, theirs)
        print(f"\n2) sweep: unablated + {args.n_masks} masks (clipheads encodes the captions once)\n"
              f"  clipheads       {t_ours:8.2f} s\n  clip_benchmark  {t_theirs:8.2f} s\n"
              f"  ratio clip_benchmark/clipheads = {t_theirs / t_ours:.2f}")
        print(f"\nall metrics identical: {same}")


if __name__ == "__main__":
    main()
