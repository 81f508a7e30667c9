"""``clipheads info`` and ``clipheads mask``: look at a model's heads and write head masks."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.options import (
    BatchSize,
    Device,
    Heads,
    Layers,
    MeansFrom,
    MeansKind,
    ModelName,
    Out,
    SkipBad,
    finite,
    with_load_options,
)
from clipheads.errors import DataError, MaskError

console = Console()

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def info(model: ModelName = None, device: Device = "cpu") -> None:
    """Show a model's image-encoder attention: layers, heads per layer, head dim, image size."""
    import clipheads

    backend = clipheads.load(model, device=device)
    a = backend.architecture
    table = Table(title=backend.name, show_header=False)
    rows = {"backend": backend.kind, "class": type(backend.model).__name__, "layers": a.n_layers,
            "heads per layer": a.n_heads, "head dim": a.head_dim, "width": a.width, "image size": backend.image_size,
            "heads in total": a.n_layers * a.n_heads}
    for key, value in rows.items():
        table.add_row(key, str(value))
    console.print(table)
    console.print(f"Heads are named L0.H0 .. L{a.n_layers - 1}.H{a.n_heads - 1} (0-based).")


def mask(
    out: Out = None,
    heads: Heads = None,
    layers: Layers = None,
    gate: float = typer.Option(0.0, callback=finite(0, 1),
                               help="Gate of the chosen heads: 0 = ablate fully, between 0 and 1 = soft."),
    means_from: MeansFrom = None,
    means: MeansKind = "per-position",
    model: ModelName = None,
    batch_size: BatchSize = None,
    device: Device = "cpu",
    skip_bad: SkipBad = False,
) -> None:
    """Write a head mask (JSON) for a model; 'clipheads eval --mask' and the Python API read it.

    --heads and --layers (whole layers) name the heads to ablate; --means-from stores each head's mean output over
    those images in the mask (needed by --op mean), read --batch-size images at a time.
    """
    import clipheads
    from clipheads.files import check_output_file

    if not heads and not layers:
        raise MaskError("give --heads and/or --layers")
    check_output_file(out, "json")
    from clipheads.interventions import check_means_kind

    check_means_kind(means)
    backend = clipheads.load(model, device=device)
    result = clipheads.HeadMask.ones(backend)
    if heads:
        result.gates = torch.minimum(result.gates, clipheads.HeadMask.from_heads(heads, backend, value=gate).gates)
    if layers:
        result.gates = torch.minimum(result.gates, clipheads.HeadMask.from_layers(layers, backend, value=gate).gates)
    if means_from is not None:
        skipped: list[str] = []
        result.means = clipheads.compute_head_means(backend, _image_batches(backend, means_from, batch_size, skip_bad,
                                                                            skipped),
                                                    kind=means)
        result.meta["means_from"] = str(means_from)
        if skipped:
            result.meta["skipped_images"] = skipped
            console.print(f"[yellow]{len(skipped)} unreadable images skipped (first: {skipped[0]})[/]")
    result.meta["model"] = backend.name
    result.save(out)
    console.print(f"{result!r} -> {out}")


def _image_batches(backend, folder: Path, batch_size: int, skip_bad: bool = False, skipped: list[str] | None = None):
    from clipheads.data import image_loader, iter_pixels

    if not Path(folder).is_dir():  # rglob finds nothing under a file: 'no images found under' would mislead
        raise DataError(f"--means-from {str(folder)!r} is a file; give a folder of reference images")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images (.png/.jpg/...) found under {str(folder)!r}")
    skipped = [] if skipped is None else skipped
    n_read = 0
    for batch in iter_pixels(image_loader(files, backend.preprocess, batch_size), skip_bad=skip_bad, skipped=skipped,
                             progress=True):
        n_read += len(batch.indices)
        yield batch.pixels
    if n_read == 0:
        raise DataError(f"none of the {len(files)} images under {str(folder)!r} could be read (first: "
                        f"{skipped[0]!r})")


def register(app: typer.Typer) -> None:
    app.command("info")(with_load_options(info))
    app.command("mask")(with_load_options(mask))
