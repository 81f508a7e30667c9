"""How AAT-BP's defaults (``BPConfig``) were chosen: a few settings on the bundled model and world (seed 0).

Gates are fitted on the first N ``val_ood`` images (two captions each), each setting is compared on 300 other
``val_ood`` images (the selection split) and ``test_ood`` (300 images) is only reported. One JSON line per setting:
mean-R in percent on the three splits (and the unablated model's), the lowest learned gate, the ablated heads.

    OMP_NUM_THREADS=1 python benchmarks/bp_defaults.py 300 --out /tmp/bp-defaults
    OMP_NUM_THREADS=1 python benchmarks/bp_defaults.py 150 --out /tmp/bp-defaults
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import clipheads
from clipheads.demo.data import load_retrieval_set
from clipheads.search import BPConfig, MaskEvaluator, bp_search, retrieval_objective
from clipheads.world import WorldSizes, make_world

SETTINGS = [dict(init_logit=3.0, lr=0.1, beta=0.1), dict(init_logit=3.0, lr=0.1, beta=0.01),
            dict(init_logit=3.0, lr=0.2, beta=0.1), dict(init_logit=1.5, lr=0.1, beta=0.1),
            dict(init_logit=1.5, lr=0.2, beta=0.1), dict(init_logit=1.5, lr=0.2, beta=0.01)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n_fit", type=int, help="val_ood images the gates are fitted on (at most 300)")
    parser.add_argument("--out", type=Path, default=Path("bp-defaults"), help="world and results folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = make_world(args.out / "world", seed=0, progress=False,
                       sizes=WorldSizes(train=0, val_ood=600, test_ood=300, test_iid=0, test_anti=0, compositional=0,
                                        counterfactual=0))
    backend = clipheads.load("bundled")
    val = load_retrieval_set(backend, world.retrieval, "val_ood")
    test = load_retrieval_set(backend, world.retrieval, "test_ood")

    def subset(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keep = [i for i, image in enumerate(val.text_to_image.tolist()) if image in rows]
        index = {image: j for j, image in enumerate(rows)}
        return (val.pixels[rows], val.text_features[keep],
                torch.tensor([index[int(val.text_to_image[i])] for i in keep]))

    def evaluator(pixels, features, text_to_image, split):
        return MaskEvaluator(backend, pixels, retrieval_objective(features, text_to_image), split=split,
                             progress=False)

    fit, choose = subset(list(range(args.n_fit))), subset(list(range(300, 600)))
    ev_fit = evaluator(*fit, f"val_ood[:{args.n_fit}]")
    ev_choose = evaluator(*choose, "val_ood[300:]")
    ev_test = evaluator(test.pixels, test.text_features, test.text_to_image, "test_ood")
    rows = []
    for setting in SETTINGS:
        started = time.perf_counter()
        result = bp_search(ev_fit, fit[1], fit[2], BPConfig(epochs=10, batch_size=64, **setting))
        rows.append({**setting, "n_ablated": result.mask.n_ablated, "ablated": result.mask.ablated,
                     "min_gate": float(result.gates.min()),
                     "fit": 100 * result.search_metric, "fit_vanilla": 100 * result.search_baseline,
                     "choose": 100 * ev_choose.evaluate(result.mask), "choose_vanilla": 100 * ev_choose.baseline,
                     "test": 100 * ev_test.evaluate(result.mask), "test_vanilla": 100 * ev_test.baseline,
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    (args.out / f"bp_defaults_{args.n_fit}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
