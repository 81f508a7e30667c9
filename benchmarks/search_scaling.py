"""How the search's memory and time grow with the number of search images under a fixed ``--memory-budget``.

For each N (one fresh process per N, so that each peak is its own): a random ViT-B/16 (open_clip or transformers,
random init, no weights), N random images, a :class:`~clipheads.search.MaskEvaluator` planned for the budget (the
decoded pixels count against it on the CPU, as in the CLI), then a handful of single-head masks spread over the
layers. Printed per size:

    N=<n> plan=<short description> peak=<MiB> MiB cache_build=<s> s per_mask=<s> s

peak: the process's peak RSS on the CPU (``resource.getrusage``: model, libraries, pixels and cache together),
``torch.cuda.max_memory_allocated`` on a GPU (the pixels stay on the host there). cache_build: building the cache
(the unablated forward over all N images). per_mask: wall seconds per evaluated mask, the mean over ``--masks``
single-head masks (head 0) at the middle layers of equal bands of layers (4 masks on 12 layers: L1, L4, L7, L10),
so that their mean cost is that of a single-head scan's mask. Last lines: ``peak memory growth N=<smallest> ->
N=<largest>: <ratio>x``, then the seconds per mask per image (constant when the time per mask grows linearly in N).

What a run costs: the cache build is one unablated forward of every image (N image-forwards); a mask resuming at
cached layer ``c`` costs about ``(L - c) / L`` image-forwards per image. The default sizes are 1344 images in all:
at ``s`` seconds per image-forward the builds take ``1344 s`` and 4 masks about ``4 x 1344 x (0.5 to 1) s`` more.

    python benchmarks/search_scaling.py                       # N = 64, 256, 1024 under 2 GiB (CPU: long)
    python benchmarks/search_scaling.py --sizes 16,32,64 --budget 256MiB
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def load_model(backend: str, device: str):
    from clipheads.models.random_init import random_hf_clip, random_open_clip

    model = random_open_clip("ViT-B-16") if backend == "open_clip" else random_hf_clip("ViT-B/16")
    return model.to(device)


def mask_layers(n_layers: int, masks: int) -> list[int]:
    """The middle layer of each of ``masks`` equal bands of layers (12 layers, 4 masks: 1, 4, 7, 10)."""
    masks = max(1, min(masks, n_layers))
    return [(2 * i + 1) * n_layers // (2 * masks) for i in range(masks)]


def one_size(n: int, args) -> dict:
    """The measurements of one N, in this process."""
    from clipheads.interventions import HeadMask
    from clipheads.search import MaskEvaluator, Objective

    torch.set_num_threads(args.threads)
    model = load_model(args.backend, args.device)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 3, model.image_size, model.image_size, generator=generator)
    with torch.no_grad():
        dim = model.encode_image(pixels[:1].to(args.device)).shape[1]
    captions = torch.randn(n, dim, generator=generator).to(args.device)

    def score(features: torch.Tensor) -> float:
        logits = 10 * F.normalize(features.float(), dim=-1) @ F.normalize(captions, dim=-1).T
        return float(logits.log_softmax(dim=1).diagonal().mean())

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    evaluator = MaskEvaluator(model, pixels, Objective(score, "caption_log_prob"), batch_size=args.batch_size,
                              memory_budget=args.budget, other_bytes=0 if cuda else pixels.numel() * 4)
    sync()
    build, build_cpu = time.perf_counter() - start, time.process_time() - cpu
    progress(f"#   N={n}: cache built in {build:.1f} s ({build_cpu:.1f} s CPU): {evaluator.plan.describe()}")
    layers = mask_layers(model.n_layers, args.masks)
    times, cpu_times = [], []
    for layer in layers:  # one at a time: the time of one mask, not of a stacked group
        start, cpu = time.perf_counter(), time.process_time()
        evaluator.evaluate(HeadMask.from_heads([(layer, 0)], model))
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        progress(f"#   N={n}: mask L{layer}.H0 {times[-1]:.1f} s ({cpu_times[-1]:.1f} s CPU)")
    per_mask = sum(times) / len(times)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"n": n, "plan": evaluator.plan.short(), "describe": evaluator.plan.describe(), "peak": peak,
            "rss_model": rss_model, "build": build, "per_mask": per_mask, "layers": layers, "times": times,
            "build_cpu": build_cpu, "per_mask_cpu": sum(cpu_times) / len(cpu_times)}


def progress(line: str) -> None:
    """A progress line on stderr (the parent's stderr: shown while a long size runs)."""
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,256,1024", help="comma-separated N (default 64,256,1024)")
    parser.add_argument("--budget", default="2GiB", help="--memory-budget of the search (default 2GiB)")
    parser.add_argument("--backend", choices=["open_clip", "hf"], default="open_clip")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="rows per forward asked for (default 16: on one CPU thread larger forwards are not "
                             "cheaper per image, and smaller ones leave more of the budget to cached layers)")
    parser.add_argument("--masks", type=int, default=4, help="single-head masks evaluated per size (default 4)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_size(args.child, args)))
        return

    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# search scaling: random {args.backend} ViT-B/16, budget {args.budget}, batch {args.batch_size}, "
          f"{args.masks} masks per size; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{device}, {os.cpu_count()} cores, {args.threads} threads, load average {load}, torch {torch.__version__}")
    results, begin = [], time.perf_counter()
    for n in sizes:
        child = [sys.executable, __file__, "--child", str(n), "--budget", args.budget, "--backend", args.backend,
                 "--batch-size", str(args.batch_size), "--masks", str(args.masks), "--threads", str(args.threads),
                 "--device", args.device]
        done = subprocess.run(child, stdout=subprocess.PIPE, text=True)  # its stderr: progress and errors, as they come
        if done.returncode != 0:
            print(f"N={n} failed (exit status {done.returncode}; its error is above)")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        masks = ", ".join(f"L{layer}.H0 {t:.1f} s" for layer, t in zip(r["layers"], r["times"], strict=True))
        print(f"#   N={n}: {r['describe']}; RSS after loading the model {r['rss_model']:.0f} MiB; masks: {masks}")
        print(f"N={n} plan={r['plan']} peak={r['peak']:.0f} MiB cache_build={r['build']:.2f} s "
              f"per_mask={r['per_mask']:.2f} s", flush=True)
    if len(results) >= 2:
        first, last = results[0], results[-1]
        print(f"peak memory growth N={first['n']} -> N={last['n']}: {last['peak'] / first['peak']:.2f}x")
    if results:
        per_image = " ".join(f"N={r['n']}:{r['per_mask'] / r['n']:.3f}" for r in results)
        build = " ".join(f"N={r['n']}:{r['build'] / r['n']:.3f}" for r in results)
        print(f"# seconds per mask per image: {per_image}; cache build seconds per image: {build}")
        cpu = " ".join(f"N={r['n']}:{r['build_cpu'] / r['n']:.3f}/{r['per_mask_cpu'] / r['n']:.3f}" for r in results)
        print(f"# CPU seconds of this process per image (cache build/per mask; wall time also counts waiting for a "
              f"core on a shared machine): {cpu}")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# total {time.perf_counter() - begin:.0f} s wall; load average at the end {load}")


if __name__ == "__main__":
    main()
