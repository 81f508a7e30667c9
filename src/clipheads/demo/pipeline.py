"""``clipheads demo``: the whole pipeline on the bundled model and a world generated on the fly.

vanilla held-out evaluation -> single-head scan (val_ood) -> greedy, AAT-GA and AAT-BP (all on val_ood) ->
held-out evaluation of the found masks (test splits) -> which heads carry the planted cue -> layer scan with
caption selection -> head descriptions (TextSpan) and CCS -> the head atlas (``atlas.html``) and one self-contained
HTML report that links it, plus JSON.

Design on validation data, report on test data: masks are chosen on ``val_ood`` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

import clipheads
from clipheads.demo.cue import cue_share
from clipheads.demo.data import RetrievalSet, load_retrieval_set
from clipheads.errors import ClipHeadsError
from clipheads.files import check_output_dir, write_json_atomic
from clipheads.heads import parse_layer_ranges
from clipheads.metrics.matching import caption_selection_metrics
from clipheads.progress import StageEvent, Stages
from clipheads.runtime import run_meta
from clipheads.search import (
    BPConfig,
    GAConfig,
    GreedyConfig,
    MaskEvaluator,
    bp_search,
    ga_search,
    greedy_search,
    retrieval_objective,
    scan_heads,
)
from clipheads.world import WorldSizes, make_world
from clipheads.world.make import check_world_folder

log = logging.getLogger(__name__)

HELD_OUT = ("test_ood", "test_iid", "test_anti")
# what the demo writes in its folder (name -> kind): an existing entry of another kind is never overwritten
DEMO_OUTPUTS = {"summary.json": "json", "report.html": "html", "mask_*.json": "json", "world": "dir",
                "atlas.html": "html"}


@dataclass
class DemoConfig:
    """Sizes of one demo run. ``quick()`` is the reduced run used in CI."""

    model: str = "bundled"
    seed: int = 0
    n_eval: int = 500  # images per held-out / validation split
    n_selection: int = 200
    n_counterfactual: int = 30  # cue groups for the cue analysis
    n_describe: int = 500  # images for TextSpan
    ga: GAConfig = None  # type: ignore[assignment]
    bp: BPConfig = None  # type: ignore[assignment]
    layer_ranges: str = "0-1,2-3,4-5"
    k: int = 5
    n_atlas: int = 24  # val_ood images in the head atlas (atlas.html): its top images; the first 3 get maps

    def __post_init__(self) -> None:
        self.ga = self.ga or GAConfig(population=24, generations=12, seed=self.seed)
        self.bp = self.bp or BPConfig(seed=self.seed)  # the library's defaults (10 epochs of 64 pairs)
        if self.n_atlas < 2:
            raise ClipHeadsError(f"the demo's head atlas needs at least 2 images; n_atlas is {self.n_atlas}")

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        return cls(n_eval=150, n_selection=60, n_counterfactual=8, n_describe=150,
                   ga=GAConfig(population=10, generations=4),
                   bp=BPConfig(batch_size=50), **overrides)


@dataclass
class SelectionSet:
    """Caption-selection items with images preprocessed and candidate captions encoded once."""

    items: list[dict]
    pixels: torch.Tensor  # [N, 3, H, W]
    candidates: list[torch.Tensor]  # per image: [C, D] normalised candidate features


@torch.inference_mode()
def load_selection_set(backend, path: Path, limit: int | None = None) -> SelectionSet:
    import json

    items = json.loads(Path(path).read_text())[:limit]
    root = Path(path).parent
    pixels = []
    for item in items:
        with Image.open(root / item["image"]) as image:
            pixels.append(backend.preprocess(image))
    return SelectionSet(items, torch.stack(pixels),
                        [backend.encode_text(item["candidates"], normalize=True).float() for item in items])


@torch.inference_mode()
def caption_selection(backend, data: SelectionSet, mask=None, op: str = "identity") -> dict:
    """Pick the best of each image's candidate captions (:func:`clipheads.metrics.caption_selection_metrics`):
    accuracy (%), CLIP score (100*max(cos,0)) and raw cosine of the selected caption, and every candidate's logit."""
    with clipheads.ablate(backend, mask, op=op) if mask is not None else nullcontext():
        images = backend.encode_image(data.pixels, normalize=True).float()
    candidate_image = [i for i, texts in enumerate(data.candidates) for _ in range(len(texts))]
    result = caption_selection_metrics(images, torch.cat(data.candidates), candidate_image,
                                       [item["answer"] for item in data.items], backend.logit_scale)
    return {"accuracy": 100 * result.acc, "clip_score": result.clip_score, "cosine": result.cosine,
            "logits": result.logits, "selected_first": data.items[0]["candidates"][result.predictions[0]]}


def stage_plan(config: DemoConfig) -> dict[str, float]:
    """The demo's stages in order -> expected seconds, for the estimate of the time left (only ratios matter).

    Seconds per unit of work measured on one quick demo (bundled model, 1 thread, 2 shared cores, 2026-11-29; the
    search stages about 0.015 s per mask and image), times each stage's amount of work in ``config``: images, masks
    (the scan: 2 splits x 64 masks, greedy: 6 steps x 12 candidates), GA population x generations, BP epochs. The report
    stage includes the head atlas (0.5 s on one quick demo, 24 images).
    """
    n, per_mask_image = config.n_eval, 0.015
    return {"world and data": 0.077 * 4 * n, "vanilla evaluation": 0.067 * 4 * n,
            "single-head scan": per_mask_image * 2 * 64 * n, "greedy": per_mask_image * 6 * 12 * n,
            "AAT-GA": per_mask_image * config.ga.population * config.ga.generations * n,
            "AAT-BP": 0.10 * config.bp.epochs * n, "held-out evaluation": 0.20 * n,
            "cue analysis": 0.38 * config.n_counterfactual, "layer scan": 0.43 * config.n_selection,
            "describe (TextSpan)": 0.10 * config.n_describe, "CCS": 11.0, "report": 12.5}


def run_demo(out_dir: str | Path, config: DemoConfig | None = None, progress: bool = True,
             on_stage: Callable[[StageEvent], None] | None = None) -> dict:
    """Run the demo, write ``report.html``, ``summary.json`` and the masks under ``out_dir``; return the summary.

    ``on_stage`` is called as each stage ends (``[3/12] single-head scan done in 12.3 s; about 2 min 5 s left``);
    without it the events are logged at INFO. ``progress`` shows a bar per stage, named after it.

    ``out_dir`` and its ``world`` folder are checked before any work (see :data:`DEMO_OUTPUTS` and
    :func:`clipheads.world.make.check_world_folder`): an entry of another kind under one of those names, or anything
    in ``world`` that the world there did not write, stops the demo with a :class:`~clipheads.errors.ClipHeadsError`.
    """
    config = config or DemoConfig()
    out = check_output_dir(out_dir, DEMO_OUTPUTS)
    check_world_folder(out / "world")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    stages = Stages(stage_plan(config), on_stage)

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        stages.done(name, time.perf_counter() - t0)

    t0 = time.perf_counter()
    sizes = WorldSizes(train=0, val_ood=config.n_eval, test_ood=config.n_eval, test_iid=config.n_eval,
                       test_anti=config.n_eval, compositional=0, counterfactual=config.n_counterfactual)
    world = make_world(out / "world", seed=config.seed, sizes=sizes, progress=progress)
    backend = clipheads.load(config.model)
    sets: dict[str, RetrievalSet] = {split: load_retrieval_set(backend, world.retrieval, split)
                                     for split in ("val_ood", *HELD_OUT)}
    lap("world and data", t0)

    # 1. vanilla: every split's residual stream is cached once; masks then re-run only from their first layer
    t0 = time.perf_counter()
    evaluators = {split: MaskEvaluator(backend, data.pixels, retrieval_objective(data.text_features,
                                                                                 data.text_to_image),
                                       progress=progress)
                  for split, data in sets.items()}
    lap("vanilla evaluation", t0)

    # 2. single-head scan on val_ood (and on test_ood, to show how well validation predicts test)
    t0 = time.perf_counter()
    scan = scan_heads(evaluators["val_ood"])
    deltas, deltas_test = 100 * scan.delta, 100 * scan_heads(evaluators["test_ood"]).delta
    lap("single-head scan", t0)

    # 3. search on val_ood
    t0 = time.perf_counter()
    greedy = greedy_search(evaluators["val_ood"], GreedyConfig(max_heads=6, candidates=12), scan=scan)
    lap("greedy", t0)
    t0 = time.perf_counter()
    ga = ga_search(evaluators["val_ood"], config.ga, scan=scan)
    lap("AAT-GA", t0)
    t0 = time.perf_counter()
    val = sets["val_ood"]
    bp = bp_search(evaluators["val_ood"], val.text_features, val.text_to_image, config.bp)
    lap("AAT-BP", t0)

    masks = {"vanilla": clipheads.HeadMask.ones(backend), "greedy": greedy.mask, "AAT-GA": ga.mask,
             "AAT-BP": bp.mask}
    for name, mask in masks.items():
        if name != "vanilla":
            mask.meta.update({"strategy": name, "searched_on": "val_ood", "model": backend.name})
            mask.save(out / f"mask_{name.lower().replace('-', '_')}.json")
    t0 = time.perf_counter()
    results = {name: {split: 100 * ev.evaluate(mask, desc=f"held-out evaluation {name} {split}")
                      for split, ev in evaluators.items()}
               for name, mask in masks.items()}
    lap("held-out evaluation", t0)

    # 4. which heads carry the cue
    t0 = time.perf_counter()
    groups = _counterfactual_groups(backend, world.counterfactual["cue"])
    share, share_all_heads = cue_share(backend, groups)
    lap("cue analysis", t0)

    # 5. layer scan with caption selection (test_ood candidates)
    t0 = time.perf_counter()
    selection = load_selection_set(backend, world.selection["test_ood"], config.n_selection)
    layer_rows = [{"cancelled": "none", **caption_selection(backend, selection)}]
    groups_of_layers = [[layer] for layer in range(backend.n_layers)] + parse_layer_ranges(config.layer_ranges)
    for layers in tqdm(groups_of_layers, desc="layer scan", disable=not progress, leave=False):
        mask = clipheads.HeadMask.from_layers(layers, backend)
        name = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-L{layers[-1]}"
        layer_rows.append({"cancelled": name, **caption_selection(backend, selection, mask)})
    lap("layer scan", t0)

    # 6. TextSpan descriptions and CCS
    t0 = time.perf_counter()
    from clipheads.explain.judges import ClipJudge
    from clipheads.explain.pipeline import describe_model, score_heads

    pixels = sets["val_ood"].pixels[: config.n_describe]
    descriptions = describe_model(backend, [pixels[i:i + 250] for i in range(0, len(pixels), 250)], k=config.k)
    lap("describe (TextSpan)", t0)
    t0 = time.perf_counter()
    ccs = score_heads(descriptions, ClipJudge(backend), (backend.n_layers, backend.n_heads))
    lap("CCS", t0)

    # 7. the head atlas from what was computed (its time is part of the "report" stage)
    t_report = time.perf_counter()
    n_atlas = _write_atlas(out / "atlas.html", backend, world.retrieval, config.n_atlas, descriptions, ccs,
                           {"scan effect": deltas, "cue share": share})
    timings["atlas"] = round(time.perf_counter() - t_report, 1)

    summary = {
        "config": asdict(config), "model": backend.name, "world": world.to_dict(), "timings_s": timings,
        "mean_recall": results,
        "ablated": {name: mask.ablated for name, mask in masks.items()},
        "single_head_delta_val_ood": deltas.tolist(), "single_head_delta_test_ood": deltas_test.tolist(),
        "scan_val_test_correlation": float(torch.corrcoef(torch.stack([deltas.flatten(),
                                                                        deltas_test.flatten()]))[0, 1]),
        "greedy_history": greedy.history, "ga_history": ga.history, "ga_fitness": ga.fitness,
        "bp_gates": bp.gates.tolist(), "bp_history": bp.history,
        "cue_share": share.tolist(), "cue_share_all_heads": share_all_heads,
        "layer_scan": layer_rows,
        "selection_chance": 100 * sum(1 / len(item["candidates"]) for item in selection.items) / len(selection.items),
        "ccs": ccs.to_dict(), "descriptions": descriptions.to_dict(), "atlas_images": n_atlas, "run": run_meta(),
    }
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out / "summary.json", summary)
    from clipheads.demo.report import write_report

    write_report(out / "report.html", summary, deltas, share, ccs, atlas="atlas.html")
    stages.done("report", time.perf_counter() - t_report)
    return summary


def _write_atlas(path: Path, backend, retrieval: Path, n_images: int, descriptions, ccs,
                 measures: dict[str, torch.Tensor]) -> int:
    """The head atlas (:mod:`clipheads.explain.atlas`) of the first ``n_images`` val_ood images, with the demo's
    descriptions, CCS and per-head ``measures`` (``[n_layers, n_heads]``: scan effect in val_ood mean-R points, cue
    share 0-1); returns the number of images."""
    from clipheads.data import read_image
    from clipheads.explain.atlas import AtlasInputs, build_atlas, write_atlas
    from clipheads.world import read_split

    entries = read_split(retrieval, "val_ood")[:n_images]
    notes = {"scan effect": "change of val_ood mean-R (points) when the head alone is ablated",
             "cue share": "share (0-1) of the cue-driven embedding change the head writes directly",
             "CCS": f"Concept Consistency Score, 0..{ccs.k}"}
    inputs = AtlasInputs(descriptions, ccs, {**measures, "CCS": ccs.scores()}, notes)
    images = [read_image(entry["path"]) for entry in entries]
    write_atlas(path, build_atlas(backend, images, [Path(entry["path"]).name for entry in entries], inputs))
    return len(images)


def _counterfactual_groups(backend, path: Path) -> list[torch.Tensor]:
    import json

    data = json.loads(Path(path).read_text())
    root = Path(path).parent
    groups: dict[str, list] = {}
    for item in data["images"]:
        with Image.open(root / item["image"]) as image:
            groups.setdefault(item["group"], []).append(backend.preprocess(image))
    return [torch.stack(images) for images in groups.values()]
