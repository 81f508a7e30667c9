"""``clipheads eval``: score a model, as is or with a head mask ablated, on one task; print a table, write JSON."""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.options import (
    DATA_HELP,
    Alpha,
    AttributeColumns,
    BatchSize,
    Device,
    GroupColumn,
    ImageColumn,
    ImageRoot,
    LabelColumn,
    MaskFile,
    ModelName,
    NumWorkers,
    OperatorName,
    Out,
    Precision,
    Queries,
    SkewK,
    SkipBad,
    Split,
    TaskName,
    Templates,
    TextColumn,
    Threads,
    old_spelling,
    prefer_old,
    with_load_options,
    with_precision,
)
from clipheads.errors import ClipHeadsError

console = Console()

PACKAGES = ("clipheads", "torch", "transformers", "open_clip_torch", "clip_benchmark")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _load_data(task: str, data: Path, split: str | None, image_root: Path | None, templates: Path | None,
               classnames: Path | None, columns: dict[str, str | None]):
    from clipheads.data import load_dataset

    if task == "retrieval":
        return load_dataset(task, data, split=split, root=image_root, image_column=columns["image"],
                            text_column=columns["text"])
    if task == "zeroshot":
        return load_dataset(task, data, templates=templates, classnames=classnames, split=split,
                            image_column=columns["image"], label_column=columns["label"])
    if task == "selection":
        return load_dataset(task, data, root=image_root)
    if task == "compositional":
        return load_dataset(task, data, split=split)
    if task == "bias":
        return load_dataset(task, data, split=split, image_column=columns["image"], group_column=columns["group"],
                            attribute_columns=columns["attributes"], text_column=columns["text"],
                            queries=columns["queries"])
    return load_dataset(task, data)


def _load_clip_benchmark(task: str, name: str, root: Path | None, split: str, templates: Path | None):
    from clipheads.data.benchmark import load_clip_benchmark_classification, load_clip_benchmark_retrieval

    if root is None:
        raise ClipHeadsError("--dataset needs --dataset-root DIR (the folder clip_benchmark reads it from)")
    if task == "retrieval":
        return load_clip_benchmark_retrieval(name, root, split)
    if task == "zeroshot":
        return load_clip_benchmark_classification(name, root, split, templates)
    raise ClipHeadsError(f"--dataset supports the retrieval and zeroshot tasks; got {task!r}")


def eval_command(
    task: TaskName,
    data: Path = typer.Option(None, "--data", "-d", help=DATA_HELP),  # no exists=True: shard patterns
    model: ModelName = None,
    split: Split = None,
    image_root: ImageRoot = None,
    mask: MaskFile = None,
    op: OperatorName = None,
    alpha: Alpha = None,
    templates: Templates = None,
    classnames: Path = typer.Option(None, exists=True, help="zeroshot: class names, one per line in label order."),
    per_class: bool = typer.Option(False, "--per-class", help="zeroshot: also report every class's accuracy."),
    skew_k: SkewK = 10,
    k: int = old_spelling("--k", "--skew-k", min=1),
    batch_size: BatchSize = None,
    num_workers: NumWorkers = 0,
    device: Device = "cpu",
    precision: Precision = "fp32",
    skip_bad: SkipBad = False,
    cache_dir: Path = typer.Option(None, help="Keep features on disk here (safetensors + JSON), keyed by content."),
    out: Out = None,
    threads: Threads = None,
    dataset_name: str = typer.Option(None, "--dataset", help="A clip_benchmark dataset name (flickr30k, "
                                                              "mscoco_captions, imagenet1k, ...) instead of --data, "
                                                              "built by clip_benchmark from --dataset-root."),
    dataset_root: Path = typer.Option(None, exists=True, help="--dataset: the folder clip_benchmark reads it from."),
    image_column: ImageColumn = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    group_column: GroupColumn = None,
    attribute_columns: AttributeColumns = None,
    queries: Queries = None,
) -> None:
    """Evaluate a model (optionally with a head mask ablated) on one task; print a table and write JSON.

    --data: a dataset file, folder, Hugging Face dataset (save_to_disk folder, parquet), webdataset shards (file,
    folder, pattern) or ImageNet folder (paths inside are relative to it).
    """
    import clipheads
    from clipheads.eval import EVALUATORS, EncodeOptions, FeatureCache
    from clipheads.eval.benchmark import clip_benchmark_path, clip_benchmark_result, task_name
    from clipheads.files import check_output_dir, check_output_file, write_json_atomic
    from clipheads.precision import parse_precision
    from clipheads.runtime import run_meta

    task = task_name(task, list(EVALUATORS))
    inputs = {"--data": data, "--mask": mask, "--templates": templates, "--classnames": classnames,
              "--queries": queries}
    out = check_output_file(out, "json", inputs)
    check_output_file(clip_benchmark_path(out), "json", inputs)
    if cache_dir is not None:
        check_output_dir(cache_dir)
    started = time.perf_counter()
    head_mask = clipheads.HeadMask.load(mask) if mask is not None else None  # a bad mask file fails before any work
    if (data is None) == (dataset_name is None):
        raise clipheads.ClipHeadsError("give --data PATH, or --dataset NAME --dataset-root DIR (clip_benchmark)")
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import command_stages

    if dataset_name is not None:
        dataset = _load_clip_benchmark(task, dataset_name, dataset_root, split, templates)
        data = Path(f"clip_benchmark:{dataset_name}")
    else:
        whole = split.lower() in ("none", "all", "")  # as scan and search read it
        dataset = _load_data(task, data, None if whole else split, image_root, templates, classnames,
                             {"image": image_column, "text": text_column, "label": label_column,
                              "group": group_column, "attributes": attribute_columns, "queries": queries})
    if task == "bias":  # a K above an attribute's image count: refused before the model is loaded
        from clipheads.metrics.bias import check_skew_k

        check_skew_k(prefer_old(skew_k, k), {a: dataset.attributes.count(a) for a in set(dataset.attributes)},
                     dataset.source)
    backend = clipheads.load(model, device=device, dtype=parse_precision(precision).weights)
    # the stages: the dataset and the model are read first, so that their errors come before any stage line
    n_images = len(getattr(dataset, "image_paths", None) or ())  # the images to encode, where listed
    stages = command_stages({"evaluate": cost.PER_IMAGE * (n_images or cost.GUESS_IMAGES), "write results": cost.WRITE})
    options = EncodeOptions(batch_size=batch_size, num_workers=num_workers, precision=precision, skip_bad=skip_bad,
                            progress=True, cache=FeatureCache(cache_dir) if cache_dir is not None else None)
    task_args = {"zeroshot": {"per_class": per_class}, "bias": {"k": prefer_old(skew_k, k)}}.get(task, {})
    with stages.stage("evaluate"):
        result = EVALUATORS[task](backend, dataset, head_mask, op, alpha=alpha, options=options, **task_args)
    wall = time.perf_counter() - started

    ablated = head_mask is not None and head_mask.n_ablated > 0
    operator = {"name": op, **({"alpha": alpha} if alpha is not None else {})} if ablated else None
    report = {
        "task": task, "model": backend.name,
        "mask": {"path": str(mask), "ablated": head_mask.ablated} if head_mask is not None else None,
        "operator": operator,
        "dataset": {**dataset.to_dict(), "path": str(data)},
        "metrics": result.metrics,
        "details": {k: v for k, v in result.to_dict().items() if k not in ("metrics", "skipped_images")},
        "skipped_images": result.skipped_images, "n_skipped": len(result.skipped_images),
        "options": {"batch_size": batch_size, "num_workers": num_workers, "device": device, "precision": precision},
        "wall_time_s": wall, "versions": package_versions(), "run": run_meta(),
    }
    with stages.stage("write results"):
        write_json_atomic(out, report)
        benchmark = clip_benchmark_result(task, dataset.name or data.stem, model, result.metrics)
        if benchmark is not None:  # the same metrics as clip_benchmark writes them, for `clip_benchmark build`
            write_json_atomic(clip_benchmark_path(out), benchmark)
    _print(report)
    console.print(f"-> {out}")
    if benchmark is not None:
        console.print(f"-> {clip_benchmark_path(out)} (clip_benchmark)")


def _print(report: dict) -> None:
    dataset = report["dataset"]
    where = f"{dataset.get('name') or dataset['path']}" + (f" ({dataset['split']})" if dataset.get("split") else "")
    ablation = "none"
    if report["mask"] is not None:
        ablation = f"{len(report['mask']['ablated'])} heads ablated"
        if report["operator"]:
            ablation += f" ({report['operator']['name']})"
    console.print(f"model: {report['model']}")
    console.print(f"ablation: {ablation}")
    table = Table(title=f"{report['task']} on {where}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    for name, value in report["details"].get("per_class", {}).items():
        table.add_row(f"  class {name}", f"{value:.4f}")
    console.print(table)
    line = f"{report['wall_time_s']:.1f} s"
    if report["n_skipped"]:
        line += f", {report['n_skipped']} images skipped (first: {report['skipped_images'][0]})"
    console.print(line)


def register(app: typer.Typer) -> None:
    """Add ``clipheads eval``."""
    app.command("eval")(with_precision(with_load_options(eval_command)))  # --precision: autocast around it
