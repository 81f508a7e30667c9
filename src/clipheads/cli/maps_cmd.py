"""``clipheads maps``: attention maps and spatial decompositions of chosen heads as PNG overlays on images."""

from __future__ import annotations

import typer
from rich.console import Console

from clipheads.cli.options import (
    Alpha,
    Device,
    Heads,
    Images,
    MaskFile,
    ModelName,
    OperatorName,
    Out,
    with_load_options,
)

console = Console()


def maps_command(
    images: Images = ...,
    heads: Heads = ...,
    out: Out = None,
    text: str | None = typer.Option(None, help="Project the spatial decomposition on this text's embedding "
                                               "(default: no spatial maps, attention only)."),
    mask: MaskFile = None,
    op: OperatorName = None,
    alpha: Alpha = None,
    model: ModelName = None,
    device: Device = "cpu",
) -> None:
    """Draw each head's class-token attention (with and without --mask) and, with --text, its spatial
    decomposition along the text over each image; attention matrices are computed for the heads' layers only.

    --out: a folder for the PNG files and maps.json; --mask: also draw the attention with this mask applied. Under
    --mask an ablated head's map shows what the operator did (identity: the class token reads only itself, so no
    patch; cls: the same; zero/mean: nothing; scale: alpha times its attention); maps.json gives each map's attention
    on the patches (patch_attention) and whether its head was ablated.
    """
    import clipheads
    from clipheads.cli.patch_cmd import _images
    from clipheads.data import read_image
    from clipheads.explain.spatial import attention_maps, spatial_decomposition
    from clipheads.files import check_output_dir, write_json_atomic
    from clipheads.report.overlays import save_overlay

    check_output_dir(out, {"attention_*": "png", "spatial_*": "png", "maps.json": "json"})
    head_mask = clipheads.HeadMask.load(mask) if mask is not None else None  # a malformed mask: one line, first
    parsed = clipheads.parse_heads(heads)
    if not parsed:
        raise clipheads.ClipHeadsError("--heads: give at least one head, e.g. L3.H7")
    paths = _images(images, "--images")
    backend = clipheads.load(model, device=device)
    if head_mask is not None:
        try:
            head_mask.check(backend)
        except clipheads.MaskError as exc:
            raise clipheads.MaskError(f"{mask}: {exc}") from None
    for layer, head in parsed:
        if not (0 <= layer < backend.n_layers and 0 <= head < backend.n_heads):
            raise clipheads.ClipHeadsError(f"--heads: {clipheads.head_label(layer, head)} is not a head of "
                                           f"{backend.name} ({backend.n_layers} layers x {backend.n_heads} heads)")
    pil = [read_image(p) for p in paths]
    pixels = backend.as_pixels(pil)
    layers = sorted({layer for layer, _ in parsed})
    runs = {"attention": attention_maps(backend, pixels, layers)}
    if head_mask is not None:
        runs["attention_ablated"] = attention_maps(backend, pixels, layers, mask=head_mask, op=op, alpha=alpha)
    out.mkdir(parents=True, exist_ok=True)
    written: list[dict] = []
    for name, result in runs.items():
        for layer, head in parsed:
            rows = result.cls_row(layer, head)
            label = clipheads.head_label(layer, head)
            # an ablated head's map is what its operator did (identity: the class token reads only itself)
            ablated = label in result.ablated  # gate below 1 under --mask
            what = f" ({op} ablated)" if ablated else ""
            for i, path in enumerate(paths):
                target = save_overlay(pil[i], rows[i], out / f"{name}_{label}_{path.stem}.png",
                                      title=f"{label} {name.replace('_', ' ')}{what}: {path.name}")
                written.append({"kind": name, "head": label, "image": str(path), "png": target.name,
                                "ablated": ablated, "patch_attention": float(rows[i].sum())})
    if text is not None:
        spatial = spatial_decomposition(backend, pixels, parsed)
        values = spatial.grid(spatial.project(backend.encode_text([text], normalize=True)[0]))
        for k, label in enumerate(spatial.heads):
            for i, path in enumerate(paths):
                target = save_overlay(pil[i], values[i, k], out / f"spatial_{label}_{path.stem}.png",
                                      title=f"{label} along '{text}': {path.name}", signed=True)
                written.append({"kind": "spatial", "head": label, "image": str(path), "png": target.name,
                                "total": float(values[i, k].sum())})
    write_json_atomic(out / "maps.json", {"model": backend.name, "text": text, "mask": str(mask) if mask else None,
                                          "operator": op, "maps": written})
    console.print(f"{backend.name}: {len(written)} maps -> {out}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("maps")(with_load_options(maps_command))
