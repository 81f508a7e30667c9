"""``clipheads scan``, ``clipheads layers`` and ``clipheads search``: decide which heads to ablate.

Each command searches on one split and reports on a held-out one, writes its results into ``--out`` (resumable:
re-running the same command continues where it stopped) and runs under ``torchrun`` to share the work.
"""

from __future__ import annotations

import math
import os
import time
from functools import cached_property
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.options import (
    AllowSameSplit,
    Alpha,
    BatchSize,
    Beams,
    CachePrecision,
    Captioner,
    DataPath,
    Device,
    Epochs,
    Generations,
    ImageColumn,
    LabelColumn,
    LearningRate,
    MaxNewTokens,
    MeansKind,
    MemoryBudget,
    Metric,
    ModelName,
    NoReport,
    NumWorkers,
    OperatorName,
    Out,
    Population,
    Precision,
    ReportData,
    ReportSplit,
    SearchSplit,
    Seed,
    SkipBad,
    Split,
    TaskName,
    Templates,
    TextColumn,
    Threads,
    finite,
    old_spelling,
    prefer_old,
    with_load_options,
    with_precision,
)

console = Console()



def _split(split: str | None) -> str | None:
    return None if split is None or split.lower() in ("none", "all", "") else split


def _no_report(no_report: bool, report_data: Path | None, report_split: str) -> str:
    """``--report-split`` as the run reads it: ``none`` under ``--no-report`` (the run key of the old spelling, so a
    run started as ``--report-split none`` resumes)."""
    from clipheads.errors import ClipHeadsError

    if no_report and report_data is not None:
        raise ClipHeadsError("--no-report and --report-data contradict each other; give one")
    return "none" if no_report else report_split


class _Run:
    """What every command sets up: the model, the process group, the search split and the held-out split."""

    def __init__(self, model: str, device: str, precision: str, task: str, data: Path, search_split: str | None,
                 metric: str | None, batch_size: int, num_workers: int, skip_bad: bool, templates: Path | None,
                 memory_budget: str | None = None, cache_precision: str | None = None):
        import clipheads
        from clipheads.models import parse_dtype
        from clipheads.precision import parse_precision
        from clipheads.search import Distributed
        from clipheads.search.memory import parse_size

        self.budget = parse_size(memory_budget) if memory_budget else None  # bad sizes before the model loads
        self.cache_dtype = parse_dtype(cache_precision)
        self.budget_used = 0  # bytes of the caches planned so far (search and held-out split share the budget)

        self.dist = Distributed.from_env(device)
        if self.dist.active and device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        self.backend = clipheads.load(model, device=device, dtype=parse_precision(precision).weights)
        self.task, self.metric, self.templates = task, metric, templates
        self.precision, self.device = precision, device
        self.loader = {"batch_size": batch_size, "num_workers": num_workers, "skip_bad": skip_bad}
        self.batch_size = batch_size
        self._data_path, self.search_split = data, _split(search_split)
        self.means_kind = "per-position"  # of the head means for op=mean (--means)
        self.shard_images = True  # under torchrun each rank caches only its share of the images (not for AAT-BP)
        self.columns: dict = {}  # Hugging Face columns (--image-column, --text-column, --label-column)

    @cached_property
    def data(self):
        """The search split, loaded (and encoded) on first use: argument checks against the model come first."""
        return self.load(self._data_path, self.search_split)

    def print(self, *args) -> None:
        if self.dist.is_main:
            console.print(*args)

    def load(self, data: Path, split: str | None):
        from clipheads.search.tasks import load_search_data

        return load_search_data(self.backend, self.task, data, _split(split), metric=self.metric,
                                templates=str(self.templates) if self.templates else None,
                                progress=self.dist.is_main, pixel_storage=self._pixel_storage(data, split),
                                columns=self.columns, **self.loader)

    def _pixel_storage(self, data: Path, split: str | None) -> str:
        """How a split's pixels are kept (:func:`~clipheads.search.memory.plan_pixels`): from the given budget on the
        CPU (it covers the pixels), else from the host's free memory (the pixels stay on the host)."""
        from clipheads.data import load_dataset
        from clipheads.search.memory import default_budget, plan_pixels
        from clipheads.search.tasks import column_options, split_options

        options = {"retrieval": {"split": _split(split)},
                   "zeroshot": {"templates": str(self.templates) if self.templates else None,
                                **split_options(self.task, data, _split(split))}}.get(self.task, {})
        options.update(column_options(self.task, self.columns))
        n_images = len(load_dataset(self.task, data, **options).image_paths)
        on_host = self.budget if self.budget is not None and self.backend.device.type == "cpu" else None
        return plan_pixels(n_images, int(self.backend.image_size), on_host or default_budget("cpu"))

    def evaluator(self, data, op: str, alpha: float | None, held_out: bool = False):
        import clipheads
        from clipheads.search import MaskEvaluator

        means = None
        if op == "mean":
            means = clipheads.compute_head_means(self.backend, self.data.pixels.split(self.batch_size),
                                                 kind=self.means_kind)
        from clipheads.search.memory import default_budget

        pixels = 0  # a given budget on the CPU covers the decoded pixels too; the default one is what is left now
        if self.budget is None:
            self.budget = default_budget(self.backend.device)
        elif self.backend.device.type == "cpu":
            pixels = getattr(data.pixels, "nbytes", None) or data.pixels.numel() * data.pixels.element_size()
        evaluator = MaskEvaluator(self.backend, data.pixels, data.objective, op, alpha=alpha, means=means,
                                  batch_size=self.batch_size, split=data.split, distributed=self.dist,
                                  cache_stride=self.backend.n_layers if held_out else None, progress=not held_out,
                                  memory_budget=max(1, self.budget - self.budget_used), other_bytes=pixels,
                                  cache_dtype=self.cache_dtype, shard_images=self.shard_images)
        self.budget_used += evaluator.plan.cache_bytes + pixels
        from clipheads.search.memory import format_size

        stored = (data.pixels.describe() if hasattr(data.pixels, "describe") else
                  f"pixels {str(data.pixels.dtype).removeprefix('torch.')} ({format_size(data.pixels.nbytes)})")
        share = f", {evaluator.share.stop - evaluator.share.start} on this rank" if evaluator.sharded else ""
        self.print(f"{'held-out' if held_out else 'search'} cache plan ({len(data.pixels)} images{share}): "
                   f"{evaluator.plan.describe()}; {stored}")
        return evaluator

    def attribution(self, evaluator, op: str, alpha: float | None, **options):
        """The attribution estimate of every head on the search split, reusing ``evaluator``'s unablated features
        and head means; ``options``: ``surrogate``, ``order``, ``probes`` of
        :func:`~clipheads.search.attribution.attribution_scan` (its defaults otherwise)."""
        from clipheads.search.attribution import attribution_rows, attribution_scan

        rows = attribution_rows(self.backend, self.data.pixels, self.batch_size, max(1, self.budget - self.budget_used))
        self.print(f"attribution plan: {rows} images per gated forward (what the caches leave of the budget)")
        return attribution_scan(self.backend, self.data.pixels, *self.data.pairs, op=op, alpha=alpha,
                                means=evaluator.operator.means, batch_size=rows,
                                image_features=evaluator.baseline_features, **options)

    def report(self, data_path: Path, report_data: Path | None, report_split: str | None, op: str,
               alpha: float | None, allow_same_split: bool = False):
        """The held-out evaluator, or ``None`` when no held-out split was asked for; a held-out split that is the
        search split is refused before anything is encoded."""
        from clipheads.search.results import same_split_error
        from clipheads.search.tasks import split_options

        has_splits = "split" in split_options(self.task, data_path, _split(report_split))
        if report_data is None and (not has_splits or _split(report_split) is None):
            return None  # no held-out data asked for (files without splits need --report-data)
        same_file = report_data is None or Path(report_data).resolve() == Path(data_path).resolve()
        if same_file and not allow_same_split and _split(report_split) == self.search_split:
            raise same_split_error(f"{Path(data_path).name}:{self.search_split or 'all'}")
        if same_file and not allow_same_split and self._same_images(data_path, report_split):
            from clipheads.errors import ClipHeadsError

            raise ClipHeadsError(f"--search-split {self.search_split} and --report-split {report_split} of "
                                 f"{Path(data_path).name} are the same images (the data have one split); report on "
                                 "held-out data (--report-data) or pass --allow-same-split")
        return self.evaluator(self.load(report_data or data_path, report_split), op, alpha, held_out=True)

    def _same_images(self, data: Path, report_split: str | None) -> bool:
        """The held-out split reads the search split's images: data whose one split serves every name (a single
        parquet file, a flat folder of shards, a CSV without a split column) give the same rows for ``val`` and
        ``test``. JSON files are not read again: their splits are entries' fields (a missing one is an error)."""
        from clipheads.data import load_dataset
        from clipheads.search.tasks import column_options, split_options

        if Path(data).suffix.lower() == ".json":
            return False

        def images(split):
            options = {"templates": str(self.templates) if self.templates else None} if self.task == "zeroshot" else {}
            return [str(p) for p in load_dataset(self.task, data, **options, **split_options(self.task, data, split),
                                                 **column_options(self.task, self.columns)).image_paths]

        return images(self.search_split) == images(_split(report_split))

    @cached_property
    def weights(self):
        """The fingerprint of the loaded weights (see :class:`~clipheads.runkey.WeightsKey`), computed once."""
        from clipheads.runkey import WeightsKey

        return WeightsKey.of(self.backend.model)

    def config(self, command: str, model: str, data: Path, search_split, report_data, report_split, op, alpha,
               **extra) -> dict:
        """The run key (:class:`~clipheads.runkey.RunKey`, JSON form) of a command: every option that changes
        results, the fingerprints of the dataset files, their images, the templates and the weights; device, batch
        size and workers are recorded only. Cheap (no image is read) so that a folder is checked before work."""
        from clipheads.runkey import FileKey, RunKey
        from clipheads.search.tasks import DEFAULT_METRICS, dataset_key

        model_path = Path(model)
        options = {"command": command, "model": str(model_path.resolve()) if model_path.exists() else model,
                   "task": self.task, "precision": self.precision, "search_split": _split(search_split),
                   "report_split": _split(report_split), "op": op, "alpha": alpha,
                   "metric": self.metric or DEFAULT_METRICS.get(self.task),
                   **({"means": self.means_kind} if op == "mean" else {}), **extra}
        splits = (_split(search_split), *(() if report_data else (_split(report_split),)))
        inputs = {"data": dataset_key(self.task, data, self.templates, splits, self.columns),
                  "report_data": dataset_key(self.task, report_data, self.templates, (_split(report_split),),
                                             self.columns) if report_data else None,
                  "templates": FileKey.of(self.templates) if self.templates and self.task == "zeroshot" else None,
                  "weights": self.weights}
        runtime = {"device": self.device, "data": str(Path(data).resolve()), "cwd": os.getcwd(),
                   **self.loader}
        return RunKey(options, inputs, runtime).to_dict()


def _has_report(task: str, report_data: Path | None, report_split: str | None) -> bool:
    """Whether :meth:`_Run.report` will load a held-out split (the same rule, without loading anything)."""
    return report_data is not None or (task == "retrieval" and _split(report_split) is not None)


def _data_stages(task: str, report_data: Path | None, report_split: str | None) -> dict[str, float]:
    """The first stages of every command here: the model, the held-out split (when asked for), the search split."""
    from clipheads.cli import stages as cost

    plan = {}
    if _has_report(task, report_data, report_split):
        plan["held-out split"] = cost.PER_IMAGE * cost.GUESS_IMAGES
    plan["search split"] = cost.PER_IMAGE * cost.GUESS_IMAGES
    return plan


def _load_splits(run: _Run, stages, data: Path, report_data: Path | None, report_split: str | None, op: str,
                 alpha: float | None, allow_same_split: bool, work: dict[str, float]):
    """Load and encode the held-out split (if any) and the search split as stages; then revise the expected cost of
    the later stages from the number of search images: ``work`` maps stage -> seconds per search image."""
    from clipheads.cli import stages as cost

    report = None
    if "held-out split" in stages.plan:
        with stages.stage("held-out split"):
            report = run.report(data, report_data, report_split, op, alpha, allow_same_split)
        n_held = report.n_images if report is not None else cost.GUESS_IMAGES
        stages.expect("search split", cost.PER_IMAGE * n_held)  # the best guess before the search split is read
    with stages.stage("search split"):
        evaluator = run.evaluator(run.data, op, alpha)
    n_images = len(run.data.pixels)
    for name, per_image in work.items():
        stages.expect(name, per_image * n_images)
    return report, evaluator


def _scan_work(method: str, heads: int, top_k: int | None, verify_top: int | None,
               heads_per_layer: int = 12) -> dict[str, float]:
    """The stages of ``clipheads scan`` after the data -> expected seconds per search image, from the masks evaluated:
    every head, then the top-k masks (by default up to two layers' worth); attribution: one forward and a few
    backward passes (about 8 masks' work), the top-k masks and twice ``verify_top`` single heads."""
    from clipheads.cli import stages as cost

    n_top = top_k if top_k is not None else 2 * heads_per_layer
    if method == "attribution":
        return {"attribution scan and results": cost.PER_MASK_IMAGE * (8 + n_top + 2 * (verify_top or 0))}
    return {"single-head scan": cost.PER_MASK_IMAGE * (heads + n_top), "held-out evaluation": cost.PER_MASK_IMAGE}


def _search_work(strategy: str, config, betas: list[float] | None, seeded: str | None,
                 heads: int) -> dict[str, float]:
    """The stages of ``clipheads search`` after the data -> expected seconds per search image: masks evaluated
    (the scan: every head; a GA generation: its population; greedy: candidates x steps) or BP epochs."""
    from clipheads.cli import stages as cost

    work = {}
    if seeded == "scan":
        work["single-head scan"] = cost.PER_MASK_IMAGE * heads
    elif seeded == "attribution":  # one forward and a few backward passes: about 8 masks' work
        work["attribution estimate"] = cost.PER_MASK_IMAGE * 8
    if strategy == "bp":
        work["AAT-BP and held-out evaluation"] = cost.PER_BP_EPOCH_IMAGE * config.epochs
    elif strategy == "greedy":  # steps: --max-heads, else the 6 steps of the demo's greedy run
        steps = config.max_heads or 6
        work["greedy and held-out evaluation"] = cost.PER_MASK_IMAGE * (config.candidates or heads) * steps
    elif betas:
        for i, beta in enumerate(betas):
            work[f"AAT-GA beta {beta:g} ({i + 1}/{len(betas)})"] = (cost.PER_MASK_IMAGE * config.population
                                                                   * config.generations)
        work["sweep results"] = cost.PER_MASK_IMAGE
    else:
        for generation in range(config.generations):
            work[f"AAT-GA generation {generation + 1}/{config.generations}"] = cost.PER_MASK_IMAGE * config.population
        work["held-out evaluation and results"] = cost.PER_MASK_IMAGE
    return work


def _check_out(out: Path) -> None:
    """Before the model is loaded: ``--out`` must be writable and new, empty or an earlier run's folder, and not
    inside another run's folder (``scan --out s1/sub``: its files would mix with that run's)."""
    from clipheads.errors import OutputError
    from clipheads.files import check_output_dir, enclosing_folder
    from clipheads.search.state import CONFIG, is_run_config

    check_output_dir(out, marker=CONFIG)
    outer = enclosing_folder(out, CONFIG, is_run_config)
    if outer is not None:
        raise OutputError(f"--out {str(out)!r} is inside the run folder {str(outer)!r} (its {CONFIG} is an earlier "
                          "clipheads run's); runs are not nested: choose a folder outside it", path=out)


def _parse_betas(spec: str) -> list[float]:
    from clipheads.errors import ClipHeadsError

    try:
        betas = [float(b) for b in spec.split(",") if b.strip()]
    except ValueError:
        raise ClipHeadsError(f"--beta-sweep takes comma-separated numbers, e.g. 0,0.01,0.05; got {spec!r}") from None
    if not betas:
        raise ClipHeadsError(f"--beta-sweep names no beta: {spec!r}")
    bad = [b for b in betas if not math.isfinite(b)]
    if bad:  # as --beta (options.finite): a nan fitness ranks nothing and cannot be written as JSON
        raise ClipHeadsError(f"--beta-sweep takes finite numbers; got {bad[0]} in {spec!r}")
    return betas


def _require_pairs(run: _Run, what: str) -> None:
    from clipheads.errors import ClipHeadsError

    if run.data.pairs is None:
        raise ClipHeadsError(f"{what} over image-text pairs; task {run.task!r} has none (use retrieval or selection)")


def _print_result(result, out: Path) -> None:
    table = Table(title=f"{result.strategy}: {result.mask.n_ablated} heads ablated ({result.operator})")
    for column in ("split", result.metric + " vanilla", "ablated", "change"):
        table.add_column(column, justify="right" if column != "split" else "left")
    table.add_row(f"search {result.search_split}", f"{result.search_baseline:.4f}", f"{result.search_metric:.4f}",
                  f"{result.search_metric - result.search_baseline:+.4f}")
    if result.heldout_metric is not None:
        table.add_row(f"held-out {result.report_split}", f"{result.heldout_baseline:.4f}",
                      f"{result.heldout_metric:.4f}", f"{result.heldout_metric - result.heldout_baseline:+.4f}")
    console.print(table)
    heads = ", ".join(result.mask.ablated[:24]) + (" ..." if result.mask.n_ablated > 24 else "")
    console.print(f"ablated: {heads or 'none'}")
    if result.mask.n_ablated == 0:
        console.print(result.why_nothing_ablated(), style="yellow", soft_wrap=True, markup=False)
    console.print(f"{result.evaluations} masks evaluated, {result.wall_seconds:.1f} s -> {out}/mask.json, "
                  f"{out}/summary.json")


def scan_command(
    data: DataPath,
    task: TaskName = None,
    model: ModelName = None,
    search_split: SearchSplit = "val",
    report_split: ReportSplit = "test",
    no_report: NoReport = False,
    report_data: ReportData = None,
    allow_same_split: AllowSameSplit = False,
    op: OperatorName = None,
    alpha: Alpha = None,
    means: MeansKind = "per-position",
    metric: Metric = None,
    templates: Templates = None,
    image_column: ImageColumn = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    top_k: int = typer.Option(None, min=1, help="Evaluate the k most harmful heads together for k = 1..top-k."),
    checkpoint_every: int = typer.Option(None, min=1, help="Checkpoint every N heads (default: one layer's worth)."),
    out: Out = None,
    batch_size: BatchSize = None,
    num_workers: NumWorkers = 0,
    device: Device = "cpu",
    precision: Precision = "fp32",
    memory_budget: MemoryBudget = None,
    cache_precision: CachePrecision = None,
    skip_bad: SkipBad = False,
    method: str = typer.Option("exact", "--scoring", help="exact (one forward per head) or attribution (every head "
                                                          "estimated from one forward pass and its backward passes; "
                                                          "retrieval only)."),
    method_old: str = old_spelling("--method", "--scoring"),
    verify_top: int = typer.Option(None, help="attribution: ablate exactly the K heads estimated most harmful and the "
                                              "K most beneficial, and compare estimate and exact change.", min=1),
    surrogate: str = typer.Option("soft_recall", help="attribution: the smooth score differentiated: soft_recall "
                                                      "(mean recall with sigmoid ranks) or contrastive (CLIP loss)."),
    order: int = typer.Option(2, min=1, max=2, help="attribution: 1 = first-order estimate (one backward pass); 2 = "
                                                    "also the surrogate's curvature along each head's feature change "
                                                    "(two more backward passes, a more faithful ranking)."),
    probes: int = typer.Option(None, min=1, help="attribution, order 2: random probe pairs for the curvature term, two "
                                                 "backward passes each (default: 1 from 512 images, up to 4 for "
                                                 "fewer; more = less noise)."),
    threads: Threads = None,
) -> None:
    """Ablate every head alone: per-head change of the metric (heat map), and the top-k most harmful heads."""
    from clipheads.errors import ClipHeadsError
    from clipheads.heads import parse_head
    from clipheads.search import RunFolder, check_splits, report_heldout, scan_heads, scan_search_result, write_result
    from clipheads.search.attribution import SURROGATES

    method = prefer_old(method, method_old)
    if method not in ("exact", "attribution"):
        raise ClipHeadsError(f"unknown --scoring {method!r}; choose exact or attribution")
    if verify_top is not None and method != "attribution":
        raise ClipHeadsError("--verify-top checks an attribution estimate; use it with --scoring attribution")
    if surrogate not in SURROGATES:
        raise ClipHeadsError(f"unknown --surrogate {surrogate!r}; choose one of {', '.join(SURROGATES)}")
    report_split = _no_report(no_report, report_data, report_split)
    started = time.perf_counter()
    _check_out(out)
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import command_stages
    from clipheads.interventions import check_means_kind

    check_means_kind(means)
    run = _Run(model, device, precision, task, data, search_split, metric, batch_size, num_workers, skip_bad,
               templates, memory_budget, cache_precision)
    run.means_kind = means
    run.columns = {"image_column": image_column, "text_column": text_column, "label_column": label_column}
    work = _scan_work(method, run.backend.n_layers * run.backend.n_heads, top_k, verify_top, run.backend.n_heads)
    stages = command_stages({**_data_stages(task, report_data, report_split),
                             **{name: per * cost.GUESS_IMAGES for name, per in work.items()},
                             **({} if method == "attribution" else {"write results": cost.WRITE})},
                            show=run.dist.is_main)
    if method == "attribution":
        config = run.config("scan", model, data, search_split, report_data, report_split, op, alpha, top_k=top_k,
                            method="attribution", surrogate=surrogate, order=order, probes=probes,
                            verify_top=verify_top)
    else:
        config = run.config("scan", model, data, search_split, report_data, report_split, op, alpha, top_k=top_k)
    RunFolder.check(out, config)  # another run in --out is refused before anything is encoded
    if method == "attribution":
        _require_pairs(run, "the attribution scan differentiates a smooth retrieval score")
    report, evaluator = _load_splits(run, stages, data, report_data, report_split, op, alpha, allow_same_split, work)
    if method == "attribution":
        with stages.stage("attribution scan and results"):
            _attribution_scan(run, config, evaluator, report, allow_same_split, op, alpha, top_k, verify_top, out,
                              surrogate=surrogate, order=order, probes=probes)
        return
    check_splits(evaluator, report, allow_same_split)
    folder = RunFolder(out, config, run.dist)
    with stages.stage("single-head scan"):
        scan = scan_heads(evaluator, folder, checkpoint_every, top_k)
    with stages.stage("held-out evaluation"):
        result = report_heldout(scan_search_result(scan, evaluator, time.perf_counter() - started), report)
    with stages.stage("write results"):
        write_result(result, folder)
    if run.dist.is_main:
        table = Table(title=f"Most harmful heads ({scan.operator}) on {scan.split}: vanilla {scan.metric} "
                            f"{scan.baseline:.4f}")
        for column in ("head", scan.metric, "change"):
            table.add_column(column, justify="left" if column == "head" else "right")
        for label in scan.ranking()[:10]:
            value = float(scan.scores[parse_head(label)])
            table.add_row(label, f"{value:.4f}", f"{value - scan.baseline:+.4f}")
        console.print(table)
        console.print(f"{len(scan.harmful())} heads improve {scan.metric} when ablated alone; "
                      f"heat map: {out}/head_effects.png")
        _print_result(result, out)


def _attribution_scan(run: _Run, config: dict, evaluator, report, allow_same_split: bool, op: str,
                      alpha: float | None, top_k: int | None, verify_top: int | None, out: Path, **options) -> None:
    """``scan --scoring attribution``: estimate every head's effect; score the top-k masks of the estimate exactly
    (best one reported on the held-out split); optionally verify the extreme estimates one head at a time.
    ``options`` (surrogate, order, probes) go to :meth:`_Run.attribution`."""
    import clipheads
    from clipheads.search import (
        RunFolder,
        check_splits,
        evaluate_top_k,
        plots,
        report_heldout,
        scan_search_result,
        write_result,
    )
    from clipheads.search.verify import estimated_ranking, plot_estimate_vs_exact, verify_attribution

    started = time.perf_counter()
    folder = RunFolder(out, config, run.dist)
    check_splits(evaluator, report, allow_same_split)
    estimate = run.attribution(evaluator, op, alpha, **options)
    surrogate = estimate.surrogate_name
    ranking = estimated_ranking(estimate.estimated_delta)
    estimated_scan = estimate.as_scan(run.data.split)
    evaluate_top_k(estimated_scan, evaluator, top_k)
    result = report_heldout(scan_search_result(estimated_scan, evaluator, time.perf_counter() - started,
                                               strategy="attribution-top-k"), report)
    verification = verify_attribution(evaluator, estimate.estimated_delta, verify_top) if verify_top else None
    write_result(result, folder)
    if not run.dist.is_main:
        return
    split = run.data.split
    folder.write_json("attribution.json", {**estimate.to_dict(), "split": split, "ranking": ranking,
                                           "top_k": estimated_scan.top_k,
                                           "wall_seconds": time.perf_counter() - started})
    plots.plot_head_effects(estimate.estimated_delta, folder.file("head_effects.png"),
                            title=f"Attribution estimate ({op}) on {split}",
                            label=f"estimated change of the {surrogate} surrogate when ablated "
                                  f"(order {estimate.order})")
    table = Table(title=f"Most harmful heads by attribution ({op}) on {split}: {surrogate} surrogate "
                        f"{estimate.surrogate:.4f}")
    for column in ("head", "estimated change"):
        table.add_column(column, justify="left" if column == "head" else "right")
    for label in ranking[:10]:
        table.add_row(label, f"{float(estimate.estimated_delta[clipheads.parse_head(label)]):+.4f}")
    console.print(table)
    written = [f"{out}/attribution.json", f"{out}/head_effects.png"]
    if verification is not None:
        folder.write_json("verify.json", verification.to_dict())
        plot_estimate_vs_exact(verification, folder.file("estimate_vs_exact.png"))
        table = Table(title=f"Estimate vs exact ({verification.metric} vanilla {verification.baseline:.4f})")
        for column in ("head", "estimated as", "estimated change", f"exact change of {verification.metric}"):
            table.add_column(column, justify="left" if column in ("head", "estimated as") else "right")
        for row in verification.to_dict()["heads"]:
            table.add_row(row["head"], row["group"], f"{row['estimated_delta']:+.4f}", f"{row['exact_delta']:+.4f}")
        console.print(table)
        console.print(f"Spearman {verification.spearman:.3f}, same sign {verification.sign_agreement():.0%} "
                      f"over {len(verification.heads)} heads")
        written += [f"{out}/verify.json", f"{out}/estimate_vs_exact.png"]
    console.print("-> " + ", ".join(written))
    _print_result(result, out)


def layers_command(
    data: DataPath,
    task: TaskName = None,
    model: ModelName = None,
    split: Split = None,
    ranges: str = typer.Option(None, help="Layer groups, e.g. '0-2,3-5,6-8,9-11' (default: every layer alone)."),
    op: OperatorName = None,
    alpha: Alpha = None,
    means: MeansKind = "per-position",
    metric: Metric = None,
    templates: Templates = None,
    out: Out = None,
    batch_size: BatchSize = None,
    num_workers: NumWorkers = 0,
    device: Device = "cpu",
    precision: Precision = "fp32",
    memory_budget: MemoryBudget = None,
    cache_precision: CachePrecision = None,
    skip_bad: SkipBad = False,
    generate: bool = typer.Option(False, "--generate", help="Also generate a caption per image with a decoder "
                                  "driven by the image encoder with each layer/range cancelled (and unmodified), and "
                                  "compare its CLIP score with the selected caption's. Both are scored by the "
                                  "UNMODIFIED CLIP model, as in the layer-wise study. Needs --captioner."),
    captioner: Captioner = None,
    beams: Beams = 1,
    max_new_tokens: MaxNewTokens = 20,
    prefix_from_selection: bool = typer.Option(True, "--prefix-from-selection/--no-prefix-from-selection",
                                               help="With --generate: continue the caption the (cancelled) model "
                                                    "selected (caption selection); otherwise generate freely."),
    prefix_words: int = typer.Option(None, min=1, help="With --prefix-from-selection: only the first N words of the "
                                                       "selected caption are the prefix (default: all of it)."),
    generate_limit: int = typer.Option(None, min=1, help="With --generate: caption only the first N images "
                                                         "(default: all)."),
    examples: int = typer.Option(2, min=0, help="With --generate: images whose captions are printed."),
    threads: Threads = None,
) -> None:
    """Cancel every head of each layer (or layer range): the metric per group; for caption selection also the
    selected caption and every candidate's logits (layers.json). With --generate, also a generated caption per group
    and its CLIP score next to the selected caption's (scored by the unmodified model)."""
    from clipheads.heads import parse_layer_ranges
    from clipheads.runkey import FileKey
    from clipheads.search import RunFolder, scan_layers

    if generate and captioner is None:
        raise typer.BadParameter("--generate needs --captioner PATH", param_hint="--captioner")
    if generate and prefix_from_selection and task != "selection":
        raise typer.BadParameter("--prefix-from-selection needs --task selection (or --no-prefix-from-selection)",
                                 param_hint="--prefix-from-selection")
    _check_out(out)
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import command_stages
    from clipheads.interventions import check_means_kind

    check_means_kind(means)
    run = _Run(model, device, precision, task, data, split, metric, batch_size, num_workers, skip_bad, templates,
               memory_budget, cache_precision)
    stages = command_stages({**_data_stages(task, None, None), **({"captioner": cost.LOAD_MODEL} if generate else {}),
                             "layer scan": cost.PER_LAYER_IMAGE * cost.GUESS_IMAGES}, show=run.dist.is_main)
    run.means_kind = means
    groups = run.backend.n_layers
    if ranges:
        groups = len(parse_layer_ranges(ranges, run.backend.n_layers))  # a bad range fails before the data is encoded
    extra = {"ranges": ranges}
    if generate:
        extra["generate"] = {"captioner": str(captioner.resolve()), "beams": beams, "max_new_tokens": max_new_tokens,
                             "prefix_from_selection": prefix_from_selection, "prefix_words": prefix_words,
                             "limit": generate_limit}
    config = run.config("layers", model, data, split, None, None, op, alpha, **extra)
    if generate:
        config["inputs"]["captioner"] = {"kind": "file", **FileKey.of(captioner).to_dict()}
    RunFolder.check(out, config)  # another run in --out is refused before anything is encoded
    _, evaluator = _load_splits(run, stages, data, None, None, op, alpha, False,
                                {"layer scan": cost.PER_LAYER_IMAGE * (groups + 1)})
    folder = RunFolder(out, config, run.dist)
    captioning = None
    if generate:
        with stages.stage("captioner"):
            captioning = _layerwise_captioning(run, captioner, op, alpha, beams, max_new_tokens,
                                               prefix_from_selection, prefix_words, generate_limit, num_workers,
                                               skip_bad)
    with stages.stage("layer scan"):
        result = scan_layers(evaluator, ranges, run.data.details, folder, generate=captioning)
    if run.dist.is_main:
        table = Table(title=f"Layer scan ({result.operator}) on {result.split}")
        for column in ("layers cancelled", result.metric, "change"):
            table.add_column(column, justify="left" if column.startswith("layers") else "right")
        table.add_row("none", f"{result.baseline:.4f}", "")
        for label, score in zip(result.labels, result.scores, strict=True):
            table.add_row(label, f"{score:.4f}", f"{score - result.baseline:+.4f}")
        console.print(table)
        if result.generation is not None:
            _print_layer_captions(result, examples)
        console.print(f"-> {out}/layers.json, {out}/layer_scan.png")


def _layerwise_captioning(run: _Run, captioner: Path, op: str, alpha: float | None, beams: int, max_new_tokens: int,
                          prefix_from_selection: bool, prefix_words: int | None, limit: int | None, num_workers: int,
                          skip_bad: bool):
    from clipheads.captions import PrefixCaptioner, load_captioner
    from clipheads.captions.layerwise import LayerwiseCaptionConfig, LayerwiseCaptioning, selection_caption_pixels

    loaded = load_captioner(captioner, device=run.backend.device)
    trained_on = loaded.config.clip_model if isinstance(loaded, PrefixCaptioner) else ""
    if trained_on and trained_on != run.backend.name:
        run.print(f"[yellow]the captioner was trained on the image embeddings of {trained_on!r}, not "
                  f"{run.backend.name!r}[/]")
    caption_pixels = None
    if run.task == "selection":
        from clipheads.search.pixels import PixelStore

        stored = run.data.pixels.storage if isinstance(run.data.pixels, PixelStore) else "float32"  # the same plan
        caption_pixels = selection_caption_pixels(loaded, run.data, run.batch_size, num_workers, skip_bad,
                                                  storage=stored)
    elif not isinstance(loaded, PrefixCaptioner):
        raise typer.BadParameter("a VisionEncoderDecoderModel captioner needs --task selection",
                                 param_hint="--captioner")
    config = LayerwiseCaptionConfig(num_beams=beams, max_new_tokens=max_new_tokens,
                                    prefix_from_selection=prefix_from_selection, prefix_words=prefix_words, op=op,
                                    alpha=alpha, n_images=limit,
                                    batch_size=run.batch_size, captioner=str(captioner))
    return LayerwiseCaptioning(loaded, run.backend, run.data.pixels, config, caption_pixels)


def _print_layer_captions(result, examples: int) -> None:
    """The study's tables: mean CLIP scores per group, then the captions of the first ``examples`` images."""
    rows = [result.baseline_generation, *result.generation]
    n_images = len(rows[0].generated)
    has_selection = bool(rows[0].selected)
    table = Table(title=f"Generated captions, {n_images} images (CLIP scores: 100 x max(cos, 0) under the "
                        "UNMODIFIED model)")
    columns = ["layers cancelled", "mean CLIP score selected", "mean CLIP score generated", "encoder cosine"]
    for column in columns if has_selection else [c for c in columns if "selected" not in c]:
        table.add_column(column, justify="left" if column.startswith("layers") else "right")
    for row in rows:
        cells = [f"{row.mean_selected_clip_score:.1f}"] if has_selection else []
        table.add_row(row.layers, *cells, f"{row.mean_generated_clip_score:.1f}", f"{row.encoder_cosine:.3f}")
    console.print(table)
    for image in range(min(examples, n_images)):
        table = Table(title=f"Image {image} of {result.split} (CLIP scores under the unmodified model)")
        table.add_column("layers cancelled")
        if has_selection:
            table.add_column("selected caption")
            table.add_column("CLIP", justify="right")
        table.add_column("generated caption")
        table.add_column("CLIP", justify="right")
        for row in rows:
            cells = [row.selected[image], f"{row.selected_clip_score[image]:.1f}"] if has_selection else []
            table.add_row(row.layers, *cells, row.generated[image], f"{row.generated_clip_score[image]:.1f}")
        console.print(table)


def search_command(
    data: DataPath,
    strategy: str = typer.Option("ga", help="ga (AAT-GA), bp (AAT-BP) or greedy (forward selection)."),
    task: TaskName = None,
    model: ModelName = None,
    search_split: SearchSplit = "val",
    report_split: ReportSplit = "test",
    no_report: NoReport = False,
    report_data: ReportData = None,
    allow_same_split: AllowSameSplit = False,
    op: OperatorName = None,
    alpha: Alpha = None,
    means: MeansKind = "per-position",
    metric: Metric = None,
    templates: Templates = None,
    image_column: ImageColumn = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    beta: float = typer.Option(None, callback=finite(),
                               help="Fitness = metric - beta x fraction of heads ablated (BP: x mean(1-gate)). "
                                    "Default: ga 0.01, greedy 0.01, bp 0.1 (BPConfig)."),
    beta_sweep: str = typer.Option(None, help="ga: comma-separated betas, one GA each (metric vs beta curve)."),
    population: Population = None,
    generations: Generations = None,
    elitism: int = typer.Option(2, min=0, help="ga: best masks kept unchanged each generation."),
    crossover: float = typer.Option(0.8, callback=finite(0, 1), help="ga: crossover rate."),
    mutation: float = typer.Option(None, callback=finite(0, 1),
                                   help="ga: per-head mutation rate (default 1 / number of heads)."),
    seed_from: str = typer.Option("scan", help="Head ranking that seeds the search: scan (exact single-head scan, "
                                               "run or resumed in OUT/scan), attribution (second-order "
                                               "estimate from one forward pass, retrieval only) or none. ga: seeds "
                                               "the population with the top-k harmful heads; greedy: --candidates "
                                               "come from it; bp (with attribution only): heads ranked harmful start "
                                               "with their gate at 0.5."),
    epochs: Epochs = None,
    lr: LearningRate = None,
    init_logit: float = typer.Option(None, callback=finite(),
                                     help="bp: initial gate logit of every head (default 1.5, gate 0.82)."),
    threshold: float = typer.Option(None, "--gate-threshold", callback=finite(0, 1),
                                    help="bp: heads with gate below this are ablated (default 0.5)."),
    threshold_old: float = old_spelling("--threshold", "--gate-threshold", callback=finite(0, 1)),
    max_heads: int = typer.Option(None, min=1, help="greedy: stop after this many heads."),
    candidates: int = typer.Option(None, min=1, help="greedy: only try the N most harmful heads of a scan."),
    seed: Seed = 0,
    out: Out = None,
    batch_size: BatchSize = None,
    num_workers: NumWorkers = 0,
    device: Device = "cpu",
    precision: Precision = "fp32",
    memory_budget: MemoryBudget = None,
    cache_precision: CachePrecision = None,
    skip_bad: SkipBad = False,
    threads: Threads = None,
) -> None:
    """Search a head mask (AAT-GA, AAT-BP or greedy) on one split and report it on a held-out split.

    bp: --epochs over the search split's image-text pairs (default 10); --lr of the gate logits (Adam; default 0.2).
    Adam moves a logit by about lr per step: from --init-logit to 0 (gate 0.5) takes at least init-logit / lr steps.
    """
    from clipheads.errors import ClipHeadsError
    from clipheads.search import (
        BPConfig,
        GAConfig,
        GreedyConfig,
        RunFolder,
        bp_search,
        check_splits,
        ga_search,
        greedy_search,
        scan_heads,
    )
    from clipheads.search import beta_sweep as run_beta_sweep

    if strategy not in ("ga", "bp", "greedy"):
        raise ClipHeadsError(f"unknown --strategy {strategy!r}; choose ga, bp or greedy")
    if seed_from not in ("scan", "attribution", "none"):
        raise ClipHeadsError(f"unknown --seed-from {seed_from!r}; choose scan, attribution or none")
    threshold = prefer_old(threshold, threshold_old)
    betas = _parse_betas(beta_sweep) if beta_sweep else None
    if betas is not None and strategy != "ga":
        raise ClipHeadsError("--beta-sweep runs AAT-GA once per beta; use it with --strategy ga")
    beta = beta if beta is not None else BPConfig.beta if strategy == "bp" else 0.01
    if strategy == "ga":  # configs check their values before the model and data are loaded
        config = GAConfig(beta, population, generations, elitism, crossover, mutation, seed=seed,
                          seed_from_scan=seed_from != "none")
    elif strategy == "bp":
        given = {"epochs": epochs, "lr": lr, "init_logit": init_logit, "threshold": threshold}
        config = BPConfig(beta=beta, batch_size=batch_size, seed=seed,  # the rest: BPConfig's defaults
                          **{key: value for key, value in given.items() if value is not None})
    else:
        config = GreedyConfig(beta, max_heads, candidates)
    report_split = _no_report(no_report, report_data, report_split)
    _check_out(out)
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import Laps, command_stages
    from clipheads.interventions import check_means_kind

    check_means_kind(means)
    seeded = seed_from if seed_from == "attribution" or (
        seed_from == "scan" and (strategy == "ga" or (strategy == "greedy" and candidates))) else None
    run = _Run(model, device, precision, task, data, search_split, metric, batch_size, num_workers, skip_bad,
               templates, memory_budget, cache_precision)
    run.columns = {"image_column": image_column, "text_column": text_column, "label_column": label_column}
    run.means_kind = means
    work = _search_work(strategy, config, betas, seeded, run.backend.n_layers * run.backend.n_heads)
    stages = command_stages({**_data_stages(task, report_data, report_split),
                             **{name: per * cost.GUESS_IMAGES for name, per in work.items()}}, show=run.dist.is_main)
    settings = run.config("search", model, data, search_split, report_data, report_split, op, alpha,
                          strategy=strategy, beta_sweep=betas, seed_from=seed_from, **config.to_dict())
    RunFolder.check(out, settings)  # another run in --out is refused before anything is encoded
    if strategy == "bp":
        _require_pairs(run, "AAT-BP trains its gates")
        run.shard_images = False  # its batches are random rows of every image's cache
    if seed_from == "attribution":
        _require_pairs(run, "--seed-from attribution differentiates a smooth retrieval score")
    report, evaluator = _load_splits(run, stages, data, report_data, report_split, op, alpha, allow_same_split, work)
    check_splits(evaluator, report, allow_same_split)
    folder = RunFolder(out, settings, run.dist)
    scan = None
    if seeded == "scan":
        with stages.stage("single-head scan"):
            scan_folder = RunFolder(out / "scan", {**settings, "command": "scan"}, run.dist)
            scan = scan_heads(evaluator, scan_folder, max_top_k=0)
    elif seeded == "attribution":
        with stages.stage("attribution estimate"):
            estimate = run.attribution(evaluator, op, alpha)
            scan = estimate.as_scan(run.data.split)
            folder.write_json("attribution.json", {**estimate.to_dict(), "ranking": scan.ranking()})
    if strategy == "bp":
        from clipheads.search.bp import plan_checkpointing

        # what the search and held-out caches and the pixels leave of the budget
        checkpointing = plan_checkpointing(evaluator, config.batch_size, max(0, run.budget - run.budget_used))
        state = "on (the graph of a batch would not fit the budget)" if checkpointing else "off"
        run.print(f"AAT-BP: activation checkpointing {state}")
        with stages.stage("AAT-BP and held-out evaluation"):
            result = bp_search(evaluator, *run.data.pairs, config, folder, report, allow_same_split,
                               seed_ranking=scan, checkpointing=checkpointing)
    elif strategy == "greedy":
        with stages.stage("greedy and held-out evaluation"):
            result = greedy_search(evaluator, config, folder, scan, report, allow_same_split)
    elif betas:
        names = [f"AAT-GA beta {b:g} ({i + 1}/{len(betas)})" for i, b in enumerate(betas)]
        laps = Laps(stages)
        sweep = run_beta_sweep(evaluator, config, betas, folder, scan, report, allow_same_split,
                               on_beta=lambda i, _result: laps.end(names[i]))
        laps.end("sweep results")
        if run.dist.is_main:
            table = Table(title=f"AAT-GA beta sweep ({evaluator.operator.describe()})")
            for column in ("beta", "heads", f"{evaluator.objective.name} search", "held-out"):
                table.add_column(column, justify="right")
            for b, r in zip(sweep.betas, sweep.results, strict=True):
                held = "" if r.heldout_metric is None else f"{r.heldout_metric:.4f}"
                table.add_row(f"{b:g}", str(r.mask.n_ablated), f"{r.search_metric:.4f}", held)
            console.print(table)
            console.print(f"-> {out}/beta_sweep.json, {out}/metric_vs_beta.png, {out}/beta_<beta>/mask.json")
        return
    else:
        names = [f"AAT-GA generation {g + 1}/{config.generations}" for g in range(config.generations)]
        laps = Laps(stages)  # a resumed run starts after the generations done before
        result = ga_search(evaluator, config, folder, scan, report, allow_same_split,
                           on_generation=lambda generation, _state: laps.end(names[generation], names[:generation]))
        laps.end("held-out evaluation and results", names)
    if run.dist.is_main:
        _print_result(result, out)


def register(app: typer.Typer) -> None:
    """Add ``clipheads scan``, ``clipheads layers`` and ``clipheads search``."""
    app.command("scan")(with_precision(with_load_options(scan_command)))  # --precision: autocast around it
    app.command("layers")(with_precision(with_load_options(layers_command)))
    app.command("search")(with_precision(with_load_options(search_command)))
