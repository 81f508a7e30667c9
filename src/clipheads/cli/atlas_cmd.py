"""``clipheads atlas``: a self-contained HTML page to browse a model's heads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.console import Console

from clipheads.cli.options import (
    DATA_HELP,
    BatchSize,
    CCSFile,
    DescriptionsFile,
    Device,
    Layers,
    MaxImages,
    ModelName,
    Out,
    Seed,
    old_spelling,
    prefer_old,
)
from clipheads.errors import DataError

console = Console()


def _table(path: Path, key: str, what: str, shape: tuple[int, int]) -> torch.Tensor:
    try:
        data = json.loads(path.read_text())
        values = torch.tensor(data[key], dtype=torch.float32)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a {what} (expected a [n_layers][n_heads] table under {key!r}: "
                        f"{type(exc).__name__})") from None
    if tuple(values.shape) != shape:
        raise DataError(f"{path}: its {key!r} table is {tuple(values.shape)}, the model has {shape} heads")
    return values


def atlas_command(
    data: Path = typer.Option(..., "--data", "-d", exists=True, help=DATA_HELP),
    out: Out = None,
    model: ModelName = None,
    descriptions: DescriptionsFile = None,
    ccs: CCSFile = None,
    scan: Path | None = typer.Option(None, exists=True, help="scan.json of 'clipheads scan' (metric change when "
                                                             "each head is ablated)."),
    cue: Path | None = typer.Option(None, exists=True, help="summary.json of 'clipheads demo' (cue share per head)."),
    layers: Layers = None,
    max_images: MaxImages = None,
    top: int = typer.Option(6, "--images-per-head", min=1, help="Images shown per head (highest along its main "
                                                                 "direction)."),
    top_old: int = old_spelling("--top", "--images-per-head", min=1),
    maps: int = typer.Option(3, min=0, help="Images with spatial and attention maps for every head."),
    batch_size: BatchSize = None,
    seed: Seed = 0,
    device: Device = "cpu",
) -> None:
    """Write one HTML page (no server; open it from the file) to browse the heads: a layer x head grid coloured
    by a measure (scan effect, CCS, cue share, TextSpan variance), and per head its texts, label, top images,
    spatial maps and attention maps."""
    import clipheads
    from clipheads.cli.explain_cmd import _image_paths
    from clipheads.data import read_image
    from clipheads.explain.atlas import AtlasInputs, build_atlas, write_atlas
    from clipheads.explain.concepts import CCSResult
    from clipheads.explain.textspan import TextSpanResult
    from clipheads.files import check_output_file
    from clipheads.heads import parse_layers

    top = prefer_old(top, top_old)
    check_output_file(out, "html")
    inputs = AtlasInputs()  # the given results are read (and refused, in one line) before images and the model
    if descriptions is not None:
        inputs.descriptions = TextSpanResult.load(descriptions)
    if ccs is not None:
        inputs.ccs = CCSResult.load(ccs)
    paths = _image_paths(data, None, max_images, seed)
    backend = clipheads.load(model, device=device)
    shape = (backend.n_layers, backend.n_heads)
    chosen = parse_layers(layers, backend.n_layers) if layers is not None else None
    if scan is not None:
        inputs.measures["scan effect"] = _table(scan, "delta", "scan result", shape)
        inputs.measure_notes["scan effect"] = "metric change when the head alone is ablated (scan.json delta)"
    if inputs.ccs is not None:
        if inputs.ccs.shape != shape:
            raise DataError(f"{ccs}: a CCS result for {inputs.ccs.shape} heads, the model has {shape}")
        inputs.measures["CCS"] = inputs.ccs.scores()
        inputs.measure_notes["CCS"] = f"Concept Consistency Score, 0..{inputs.ccs.k}"
    if cue is not None:
        inputs.measures["cue share"] = _table(cue, "cue_share", "demo summary", shape)
        inputs.measure_notes["cue share"] = "share of the planted cue's direction each head writes directly"
    images = [read_image(p) for p in paths]
    atlas = build_atlas(backend, images, [p.name for p in paths], inputs, layers=chosen, top=top, maps=maps,
                        batch_size=batch_size)
    path = write_atlas(out, atlas)
    console.print(f"{backend.name}: {len(atlas['heads'])} heads, {len(images)} images -> {path} "
                  f"({path.stat().st_size / 1e6:.2f} MB)", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("atlas")(atlas_command)
