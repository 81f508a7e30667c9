"""Threads on a shared machine: the same AAT-GA step with 1 thread, torch's default and the cores available.

One step = one AAT-GA generation: ``--population`` fresh random masks (about 5% of heads ablated, as the GA's
initial population) scored by :class:`~clipheads.search.MaskEvaluator` on the bundled model. Each thread count runs
the step ``--repeats`` times, alternating between counts, all in one process, so that ratios compare like with like
on a machine whose load changes. Then the same again while a busy-loop subprocess keeps one core busy (it ends by
itself after ``--busy-seconds`` at most, and is stopped when the measurement ends).

Prints wall time and CPU time (user + system of this process, all threads) per step, their ratios to 1 thread, the
load average before and after each condition, date, machine and thread counts.

    OMP_NUM_THREADS= python benchmarks/threads.py --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import clipheads
from clipheads.runtime import available_cores
from clipheads.search import MaskEvaluator, Objective

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=150, help="evaluation images (the quick demo's split size)")
    parser.add_argument("--population", type=int, default=24, help="masks per step (the demo's GA population)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-seconds", type=float, default=600, help="upper bound on the busy subprocess's life")
    parser.add_argument("--conditions", default="quiet,busy", help="comma list of quiet, busy")
    args = parser.parse_args()

    default_threads = torch.get_num_threads()  # torch's default, or $OMP_NUM_THREADS when set
    counts = sorted({1, default_threads, available_cores()})
    model = clipheads.load("bundled")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, model.image_size, model.image_size, generator=generator)
    with torch.inference_mode():
        dim = model.encode_image(pixels[:1]).shape[1]
    captions = torch.nn.functional.normalize(torch.randn(args.images, dim, generator=generator), dim=-1)

    def score(features: torch.Tensor) -> float:
        logits = 100 * torch.nn.functional.normalize(features.float(), dim=-1) @ captions.T
        return float(logits.log_softmax(dim=1).diagonal().mean())

    torch.set_num_threads(1)
    evaluator = MaskEvaluator(model, pixels, Objective(score, "caption_log_prob"), batch_size=64)
    n_genes = model.n_layers * model.n_heads
    mask_rng = torch.Generator().manual_seed(1)

    def step() -> None:
        masks = []
        for _ in range(args.population):
            gates = (torch.rand(n_genes, generator=mask_rng) >= 0.05).float()
            gates[int(torch.randint(n_genes, (1,), generator=mask_rng))] = 0.0  # never the unablated mask
            masks.append(clipheads.HeadMask(gates.view(model.n_layers, model.n_heads)))
        evaluator.evaluate_many(masks)

    print(f"# threads benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()} {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"# cores: os.cpu_count()={os.cpu_count()}, available (sched_getaffinity)={available_cores()}, "
          f"torch default threads={default_threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"torch {torch.__version__}")
    print(f"# step: {args.population} random masks (~5% heads ablated) scored on {args.images} images, bundled model "
          f"({model.n_layers}x{model.n_heads} heads); {args.repeats} repeats per thread count, alternating")
    step()  # warm-up
    for condition in args.conditions.split(","):
        busy = None
        if condition == "busy":
            busy = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=args.busy_seconds)])
            time.sleep(2)
        before = loadavg()
        walls: dict[int, list[float]] = {n: [] for n in counts}
        cpus: dict[int, list[float]] = {n: [] for n in counts}
        try:
            for repeat in range(args.repeats):
                for n in counts if repeat % 2 == 0 else reversed(counts):
                    torch.set_num_threads(n)
                    wall, cpu = time.perf_counter(), cpu_seconds()
                    step()
                    walls[n].append(time.perf_counter() - wall)
                    cpus[n].append(cpu_seconds() - cpu)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        label = "one core kept busy by another process" if busy is not None else "no extra load added"
        print(f"\n## {condition}: {label}; load average (1/5/15 min) before {before}, after {loadavg()}")
        print("threads  wall s/step (median)  CPU s/step (median)  wall / 1 thread  CPU / 1 thread")
        w1, c1 = statistics.median(walls[1]), statistics.median(cpus[1])
        for n in counts:
            w, c = statistics.median(walls[n]), statistics.median(cpus[n])
            print(f"{n:7d}  {w:20.2f}  {c:19.2f}  {w / w1:15.2f}  {c / c1:14.2f}")
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
