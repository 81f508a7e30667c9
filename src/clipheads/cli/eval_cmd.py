"""``clipheads eval``: score a model, as is or with a head mask ablated, on one task; print a table, write JSON."""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.options import Alpha, Device, ModelName, NumWorkers, Threads

console = Console()

TASK_HELP = ("retrieval (Karpathy JSON, COCO captions JSON, CSV image,caption), zeroshot (ImageFolder or CSV "
             "image,label), selection (JSON/CSV image + candidates + answer), compositional (JSON pairs) or bias "
             "(counterfactual JSON).")
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
               classnames: Path | None):
    from clipheads.data import load_dataset

    if task == "retrieval":
        return load_dataset(task, data, split=split, root=image_root)
    if task == "zeroshot":
        return load_dataset(task, data, templates=templates, classnames=classnames)
    return load_dataset(task, data)


def eval_command(
    task: str = typer.Option(..., "--task", "-t", help=TASK_HELP),
    data: Path = typer.Option(..., "--data", "-d", exists=True,
                              help="Dataset file or folder (paths inside are relative to it)."),
    model: ModelName = "bundled",
    split: str = typer.Option("test", help="Split of a Karpathy JSON (or CSV with a split column); 'all' keeps "
                                           "every image."),
    image_root: Path = typer.Option(None, exists=True, help="Folder the retrieval file's image paths are relative to."),
    mask: Path = typer.Option(None, exists=True, help="Head mask JSON to ablate (from 'clipheads mask' or a search)."),
    op: str = typer.Option("identity", help="Ablation operator: identity, cls, zero, mean (needs means in the "
                                            "mask) or scale (with --alpha)."),
    alpha: Alpha = None,
    templates: Path = typer.Option(None, help="zeroshot: prompt templates, one with {} per line (default: the "
                                              "set shipped with clipheads).", exists=True),
    classnames: Path = typer.Option(None, exists=True, help="zeroshot: class names, one per line in label order."),
    per_class: bool = typer.Option(False, "--per-class", help="zeroshot: also report every class's accuracy."),
    k: int = typer.Option(10, "--k", min=1, help="bias: K of MaxSkew@K."),
    batch_size: int = typer.Option(64, min=1, help="Images per batch."),
    num_workers: NumWorkers = 0,
    device: Device = "cpu",
    precision: str = typer.Option("fp32", help="fp32, or bf16 / fp16 autocast."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and count) missing or corrupt images instead of "
                                                            "stopping."),
    cache_dir: Path = typer.Option(None, help="Keep features on disk here (safetensors + JSON), keyed by content."),
    out: Path = typer.Option(None, "--out", "-o", help="Result JSON (default: eval-<task>.json)."),
    threads: Threads = None,
) -> None:
    """Evaluate a model (optionally with a head mask ablated) on one task; print a table and write JSON."""
    import clipheads
    from clipheads.eval import EVALUATORS, EncodeOptions, FeatureCache
    from clipheads.files import check_output_dir, check_output_file, write_json_atomic
    from clipheads.runtime import run_meta

    if task not in EVALUATORS:
        raise clipheads.ClipHeadsError(f"unknown --task {task!r}; choose one of {', '.join(EVALUATORS)}")
    out = check_output_file(out or Path(f"eval-{task}.json"), "json",
                            {"--data": data, "--mask": mask, "--templates": templates, "--classnames": classnames})
    if cache_dir is not None:
        check_output_dir(cache_dir)
    started = time.perf_counter()
    head_mask = clipheads.HeadMask.load(mask) if mask is not None else None  # a bad mask file fails before any work
    dataset = _load_data(task, data, None if split == "all" else split, image_root, templates, classnames)
    backend = clipheads.load(model, device=device)
    options = EncodeOptions(batch_size=batch_size, num_workers=num_workers, precision=precision, skip_bad=skip_bad,
                            progress=True, cache=FeatureCache(cache_dir) if cache_dir is not None else None)
    task_args = {"zeroshot": {"per_class": per_class}, "bias": {"k": k}}.get(task, {})
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
    write_json_atomic(out, report)
    _print(report)
    console.print(f"-> {out}")


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
    app.command("eval")(eval_command)
