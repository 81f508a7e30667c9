"""``clipheads patch``: activation patching, how much of an embedding change each head carries."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.models_cmd import IMAGE_SUFFIXES
from clipheads.cli.options import Device, Heads, ModelName, Out
from clipheads.errors import DataError

console = Console()


def _images(paths: list[Path], option: str) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    if not found:
        raise DataError(f"{option}: no images found in {', '.join(map(str, paths))}")
    return found


def patch_command(
    source: list[Path] = typer.Option(..., "--source", exists=True,
                                      help="Source image(s) or folder (sorted); repeat the option for more."),
    destination: list[Path] = typer.Option(..., "--destination", exists=True,
                                           help="Destination image(s) or folder, paired one to one with --source."),
    heads: Heads = ...,
    out: Out = None,
    model: ModelName = None,
    device: Device = "cpu",
) -> None:
    """Patch each head's output from the source image into the destination image, one head at a time and all
    together, and print which fraction of the embedding change (source minus destination) each head explains."""
    import clipheads
    from clipheads.data import read_image
    from clipheads.files import check_output_file, write_json_atomic
    from clipheads.interventions import patch_effects

    parsed = clipheads.parse_heads(heads)
    if not parsed:
        raise clipheads.ClipHeadsError("--heads: give at least one head, e.g. L3.H7")
    sources, destinations = _images(source, "--source"), _images(destination, "--destination")
    if len(sources) != len(destinations):
        raise DataError(f"{len(sources)} source and {len(destinations)} destination images; pair them one to one")
    if out is not None:
        check_output_file(out, "json")
    backend = clipheads.load(model, device=device)
    for layer, head in parsed:
        if not (0 <= layer < backend.n_layers and 0 <= head < backend.n_heads):
            raise clipheads.ClipHeadsError(f"--heads: {clipheads.head_label(layer, head)} is not a head of "
                                           f"{backend.name} ({backend.n_layers} layers x {backend.n_heads} heads)")
    src = backend.as_pixels([read_image(p) for p in sources])
    dst = backend.as_pixels([read_image(p) for p in destinations])
    pairs = [(str(s), str(d)) for s, d in zip(sources, destinations, strict=True)]
    result = patch_effects(backend, parsed, src, dst, pairs=pairs)
    console.print(f"{backend.name}: share of the embedding change (source - destination) each patched head explains, "
                  f"mean over {len(sources)} pair(s)", soft_wrap=True)
    table = Table()
    table.add_column("head")
    table.add_column("explained", justify="right")
    for label, value in result.mean_explained().items():
        table.add_row(label, f"{value:.3f}")
    table.add_row("all together", f"{float(result.joint.mean()):.3f}")
    console.print(table)
    if out is not None:
        write_json_atomic(out, {"model": backend.name, **result.to_dict()})
        console.print(f"wrote {out}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("patch")(patch_command)
