"""``clipheads world make`` and ``clipheads world train``: the synthetic world and the small CLIP trained on it."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.options import DATA_HELP, BatchSize, Device, LearningRate, Out, Precision, Seed, Threads

console = Console()

world_app = typer.Typer(
    help=("The bundled synthetic world: rendered scenes (shapes, colours, sizes, positions, relations) with captions "
          "and a planted spurious cue (a corner marker whose colour gives away the first object's shape in the "
          "training split only), and the small CLIP that clipheads trains on it and ships as 'bundled'. "
          "Typical use: 'clipheads world make --out world' then 'clipheads world train --data world --out my-clip'."),
    no_args_is_help=True,
    rich_markup_mode=None,
)


@world_app.command("make")
def make(
    out: Out = None,
    seed: Seed = 0,
    n_train: int = typer.Option(20000, min=0, help="Training images (0: held-out data only, e.g. for evaluation)."),
    n_val: int = typer.Option(1000, min=0, help="Images of the validation split val_ood (marker random: search "
                                                "heads here)."),
    n_test: int = typer.Option(1000, min=0, help="Images of each test split: test_ood (marker random), test_iid "
                                                 "(training correlation), test_anti (marker never matches)."),
    n_pairs: int = typer.Option(200, min=0, help="Image pairs with swapped colour bindings (compositional task)."),
    n_groups: int = typer.Option(100, min=0, help="Counterfactual groups per attribute (marker colour; first colour)."),
    threads: Threads = None,
) -> None:
    """Render a world and write it in the standard formats (retrieval JSON, ImageFolder, caption selection,
    compositional pairs, counterfactual groups). The same --seed writes byte-identical files.

    --out: the folder (created; an earlier world there is replaced: only the files its world.json lists; a folder
    with anything else is refused).
    """
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import Laps, command_stages
    from clipheads.world import MARKER_COLOURS, SPLITS, WorldSizes, make_world
    from clipheads.world.scene import COLOURS

    sizes = WorldSizes(train=n_train, val_ood=n_val, test_ood=n_test, test_iid=n_test, test_anti=n_test,
                       compositional=n_pairs, counterfactual=n_groups)
    # images rendered: every split's, then a pair's two images and a counterfactual group's variants
    rendered = sum(sizes.split_size(split) for split in SPLITS)
    tasks = 2 * n_pairs + n_groups * (len(MARKER_COLOURS) + len(COLOURS))
    stages = command_stages({"render splits": cost.PER_IMAGE * rendered, "task datasets": cost.PER_IMAGE * tasks})
    paths = make_world(out, seed=seed, sizes=sizes, on_stage=Laps(stages).end)
    table = Table(title=f"world (seed {seed}) in {paths.root}")
    table.add_column("dataset")
    table.add_column("format")
    table.add_column("path")
    table.add_row("retrieval (all splits)", "Karpathy JSON", _rel(paths.retrieval, paths.root))
    for split, folder in paths.classification.items():
        table.add_row(f"first-object shape, {split}", "ImageFolder", _rel(folder, paths.root))
    for split, path in paths.selection.items():
        table.add_row(f"caption selection, {split}", "selection JSON", _rel(path, paths.root))
    if paths.compositional:
        table.add_row("swapped colour bindings", "compositional JSON", _rel(paths.compositional, paths.root))
    for attribute, path in paths.counterfactual.items():
        table.add_row(f"counterfactual {attribute}", "counterfactual JSON", _rel(path, paths.root))
    console.print(table)


def _rel(path: Path | None, root: Path) -> str:
    return str(path.relative_to(root)) if path is not None else "-"


@world_app.command("train")
def train(
    data: Path = typer.Option(..., "--data", "-d", exists=True, help=DATA_HELP),
    out: Out = None,
    config: str = typer.Option("small", help="Model size: 'small' (the bundled model: 6 layers x 8 heads, ~1.7M "
                                             "parameters, CPU) or 'gpu' (12 layers x 12 heads, ViT-B/16-like)."),
    steps: int = typer.Option(1200, min=1, help="Optimiser steps (the bundled model: 1200 steps of 128)."),
    batch_size: BatchSize = None,
    lr: LearningRate = None,
    seed: Seed = 0,
    precision: Precision = "fp32",
    device: Device = "cpu",
    eval_images: int = typer.Option(1000, min=1, help="Images per held-out split for the model card's metrics."),
    threads: Threads = None,
) -> None:
    """Train a small CLIP with the contrastive loss on a world's train split and write a checkpoint with a model card
    (data, config, seed, time, held-out metrics, the command to reproduce) and checksums.

    --data: a world folder written by 'clipheads world make'; --out: the checkpoint folder (Hugging Face format; load
    it with --model OUT). --batch-size: image-caption pairs per step (contrastive batch, at least 2); --lr: the peak
    of AdamW's warm-up then cosine schedule.
    """
    from clipheads.files import check_output_dir
    from clipheads.world.train import TRAINING_FILE, TrainConfig, train_clip

    check_output_dir(out, {TRAINING_FILE: "json", "README.md": "text"}, marker=TRAINING_FILE)
    cfg = TrainConfig(preset=config, steps=steps, batch_size=batch_size, lr=lr, seed=seed, precision=precision,
                      device=device, eval_images=eval_images)
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import Laps, command_stages
    from clipheads.world import HELD_OUT

    try:  # the training images, from the world's listing (a guess when it cannot be read: the library says why)
        n_train = int(json.loads((data / "world.json").read_text())["sizes"]["train"])
    except (OSError, ValueError, KeyError, TypeError):
        n_train = cost.GUESS_IMAGES
    stages = command_stages({"read train split": cost.PER_IMAGE * n_train,
                             "train": cost.PER_BP_EPOCH_IMAGE * steps * batch_size,
                             "evaluate": cost.PER_IMAGE * eval_images * len(HELD_OUT), "write model card": cost.WRITE})
    result = train_clip(data, out, cfg, on_stage=Laps(stages).end)
    table = Table(title=f"world CLIP ({config}) after {steps} steps, {result.seconds / 60:.1f} min")
    for column in ("split", "mean-R", "first shape read", "follows the marker"):
        table.add_column(column)
    for split, r in result.metrics.items():
        table.add_row(split, f"{r.mean_recall:.1f}", f"{r.shape_accuracy:.1f}%", f"{r.cue_following:.1f}%")
    console.print(table)
    console.print(f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}; checkpoint, model card and checksums "
                  f"in {out}")


def register(app: typer.Typer) -> None:
    """Add ``clipheads world ...`` to the main app."""
    app.add_typer(world_app, name="world")
