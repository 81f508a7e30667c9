"""``clipheads captioner train`` and ``clipheads captioner generate``: a small captioner driven by CLIP's encoder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.options import (
    DATA_HELP,
    BatchSize,
    Beams,
    Captioner,
    Device,
    Epochs,
    ImageRoot,
    Images,
    LearningRate,
    MaxNewTokens,
    ModelName,
    Out,
    Seed,
    Split,
    Threads,
    old_spelling,
    prefer_old,
    with_load_options,
)
from clipheads.errors import DataError

console = Console()

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}

captioner_app = typer.Typer(help="Train a small ClipCap-style captioner on CLIP image embeddings, and caption "
                                 "images with it (or with a Hugging Face VisionEncoderDecoderModel).",
                            no_args_is_help=True, rich_markup_mode=None)


def read_karpathy_pairs(path: Path, split: str, root: Path | None = None) -> tuple[list[Path], list[str], list[int]]:
    """Image paths, captions and each caption's image index from a Karpathy split JSON (only ``split``).

    ``split="train"`` also takes ``restval`` images, as the Karpathy splits intend.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{str(path)!r} is not a Karpathy split JSON (no 'images' list)")
    root = Path(root) if root is not None else Path(path).parent
    wanted = {split, "restval"} if split == "train" else {split}
    images: list[Path] = []
    captions: list[str] = []
    index: list[int] = []
    for i, entry in enumerate(data["images"]):
        if entry.get("split") not in wanted:
            continue
        if "filename" not in entry:
            raise DataError(f"{str(path)!r}: image entry {i} has no 'filename'")
        sentences = [s.get("raw", "").strip() for s in entry.get("sentences", []) if isinstance(s, dict)]
        sentences = [s for s in sentences if s]
        if not sentences:
            continue
        images.append(root / entry.get("filepath", "") / entry["filename"])
        captions += sentences
        index += [len(images) - 1] * len(sentences)
    if not images:
        splits = sorted({str(e.get("split")) for e in data["images"]})
        raise DataError(f"{str(path)!r} has no captioned images in split {split!r} (splits: {', '.join(splits)})")
    return images, captions, index


def _image_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"no images (.png/.jpg/...) found under {str(path)!r}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"image {str(path)!r} does not exist")
    return files


def _pixel_batches(preprocess, files: list[Path], batch_size: int):
    from PIL import Image, UnidentifiedImageError

    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    batch.append(preprocess(image))
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read image {str(path)!r}: {exc}") from None
        yield torch.stack(batch)


@captioner_app.command("train")
@with_load_options
def train(
    data: Path = typer.Option(..., "--data", "-d", exists=True, help=DATA_HELP),
    out: Out = None,
    split: Split = None,
    model: ModelName = None,
    image_root: ImageRoot = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: LearningRate = None,
    prefix_length: int = typer.Option(10, min=1, help="Decoder input embeddings made from the image embedding."),
    width: int = typer.Option(256, min=8, help="Decoder width (GPT-2 n_embd)."),
    decoder_layers: int = typer.Option(4, min=1, help="Decoder layers (GPT-2 n_layer)."),
    images_root: Path = old_spelling("--images-root", "--image-root", exists=True),
    layers: int = old_spelling("--layers", "--decoder-layers", min=1),
    seed: Seed = 0,
    device: Device = "cpu",
    threads: Threads = None,
) -> None:
    """Train a ClipCap-style captioner (prefix MLP + small GPT-2) on the frozen CLIP image embeddings.

    --data: a Karpathy split JSON of image-caption pairs; --out: the folder the captioner is written to.
    """
    import clipheads
    from clipheads.captions import CaptionTrainConfig, build_captioner, encode_images, train_captioner
    from clipheads.captions.prefix import CONFIG_FILE, DECODER_DIR
    from clipheads.files import check_output_dir, write_json_atomic
    from clipheads.runtime import run_meta

    layers = prefer_old(decoder_layers, layers)
    check_output_dir(out, {CONFIG_FILE: "json", "train.json": "json", DECODER_DIR: "dir"}, marker=CONFIG_FILE)
    files, captions, index = read_karpathy_pairs(data, split, prefer_old(image_root, images_root))
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import command_stages

    backend = clipheads.load(model, device=device).eval()
    # work counts: one image-tower forward per image; a decoder forward and backward per caption and epoch
    stages = command_stages({"encode images": cost.PER_IMAGE * len(files),
                             "train": cost.PER_BP_EPOCH_IMAGE * epochs * len(captions), "write results": cost.WRITE})
    with stages.stage("encode images"):
        features = encode_images(backend, _pixel_batches(backend.preprocess, files, batch_size), progress=True)
    with stages.stage("train"):
        n_heads = 4 if width % 4 == 0 else 1
        captioner = build_captioner(captions, features.shape[-1], prefix_length=prefix_length, width=width,
                                    n_layers=layers, n_heads=n_heads, clip_model=backend.name, seed=seed).to(device)
        config = CaptionTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        result = train_captioner(captioner, features, captions, image_index=index, config=config)
    with stages.stage("write results"):
        captioner.save(out)
        write_json_atomic(out / "train.json", {"data": str(data), "split": split, "model": backend.name,
                                               **result.to_dict(), "run": run_meta()})
    table = Table(title=f"captioner on {len(files)} images, {len(captions)} captions ({result.seconds:.0f} s)")
    table.add_column("epoch", justify="right")
    table.add_column("loss", justify="right")
    for epoch, loss in enumerate(result.epoch_losses, start=1):
        table.add_row(str(epoch), f"{loss:.4f}")
    console.print(table)
    console.print(f"captioner -> {out}")


@captioner_app.command("generate")
@with_load_options
def generate(
    captioner_dir: Captioner = ...,
    images: Images = ...,
    prefix: str = typer.Option("", help="Text every caption starts with, e.g. 'a photo of a'."),
    beams: Beams = 1,
    max_new_tokens: MaxNewTokens = 20,
    model: ModelName = None,
    batch_size: BatchSize = None,
    out: Out = None,
    device: Device = "cpu",
    threads: Threads = None,
) -> None:
    """Caption images (greedy or beam search), optionally continuing a text prefix."""
    import clipheads
    from clipheads.captions import PrefixCaptioner, generate_captions, load_captioner
    from clipheads.files import check_output_file, write_json_atomic
    from clipheads.runtime import run_meta

    if out is not None:
        check_output_file(out, "json")
    captioner = load_captioner(captioner_dir, device=device)
    if isinstance(captioner, PrefixCaptioner):
        backend = clipheads.load(model or captioner.config.clip_model or "bundled", device=device).eval()
    else:
        if model is not None:
            console.print("[yellow]--model is ignored: a VisionEncoderDecoderModel reads its own CLIP encoder[/]")
        backend = captioner.backend
    files = _image_files(images)
    captions: list[str] = []
    for pixels in _pixel_batches(backend.preprocess, files, batch_size):
        captions += generate_captions(captioner, backend, pixels, prefixes=prefix or None, num_beams=beams,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size)
    table = Table(title=f"captions ({'greedy' if beams == 1 else f'beam {beams}'})")
    table.add_column("image")
    table.add_column("caption")
    for path, caption in zip(files, captions, strict=True):
        table.add_row(str(path), caption)
    console.print(table)
    if out is not None:
        write_json_atomic(out, {"captioner": str(captioner_dir), "model": backend.name, "prefix": prefix,
                                "num_beams": beams, "max_new_tokens": max_new_tokens, "run": run_meta(),
                                "captions": [{"image": str(p), "caption": c} for p, c in zip(files, captions,
                                                                                            strict=True)]})


def register(app: typer.Typer) -> None:
    app.add_typer(captioner_app, name="captioner")
