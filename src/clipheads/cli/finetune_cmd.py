"""``clipheads finetune``: fine-tune the image encoder (full, LoRA or IA3) as a baseline for AAT, or ``--compare``
AAT-GA / AAT-BP with fine-tuning and PEFT on the same training pairs (held-out mean-R, trainable parameters, time).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.options import (
    DATA_HELP,
    AllowSameSplit,
    BatchSize,
    Device,
    Epochs,
    Generations,
    LearningRate,
    ModelName,
    NumWorkers,
    OperatorName,
    Out,
    Population,
    ReportSplit,
    Seed,
    SkipBad,
    Threads,
    finite,
    old_spelling,
    prefer_old,
)

console = Console()

METHODS_HELP = ("--compare: comma-separated methods, in table order. vanilla (the model as is), aat-ga, aat-bp (AAT "
                "head masks), lora-rN (LoRA of rank N on the attention projections, e.g. lora-r8), ia3, full (every "
                "weight of the image encoder).")


def _print_table(result, title: str) -> None:
    rows = result.table()
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


def finetune_command(
    data: Path = typer.Option(..., "--data", "-d", exists=True, help=DATA_HELP),
    model: ModelName = None,
    method: str = typer.Option("lora", help="What to train: lora (low-rank adapters on the image encoder's attention "
                                            "projections), ia3 (learned scaling vectors) or full (every weight of the "
                                            "image encoder). Ignored with --compare (see --methods)."),
    lora_rank: int = typer.Option(8, min=1, help="lora: rank of the adapters (lora_alpha = 2 x rank)."),
    rank: int = old_spelling("--rank", "--lora-rank", min=1),
    epochs: Epochs = None,
    lr: LearningRate = None,
    full_lr: float = typer.Option(None, help="--compare: learning rate of full fine-tuning (default: --lr if given, "
                                             "else 1e-5).", callback=finite(above=0)),
    train_split: str = typer.Option("train", help="Split whose image-text pairs every method trains on."),
    val_split: str = typer.Option("val", help="Split scored after every epoch (the mean-R per epoch curves)."),
    report_split: ReportSplit = "test",
    allow_same_split: AllowSameSplit = False,
    compare: bool = typer.Option(False, "--compare", help="Run every method of --methods on the same pairs and write "
                                                          "comparison.json, comparison.md and the plots."),
    methods: str = typer.Option("vanilla,aat-ga,aat-bp,lora-r2,lora-r8,full", help=METHODS_HELP),
    op: OperatorName = None,
    ga_beta: float = typer.Option(0.01, callback=finite(),
                                  help="aat-ga: fitness = mean-R - beta x fraction of heads ablated."),
    population: Population = None,
    generations: Generations = None,
    bp_beta: float = typer.Option(0.1, callback=finite(), help="aat-bp: loss = contrastive + beta x mean(1 - gate)."),
    bp_epochs: int = typer.Option(None, min=0, help="aat-bp: epochs over the training pairs (default: --epochs)."),
    bp_lr: float = typer.Option(0.2, callback=finite(above=0), help="aat-bp: learning rate of the gate logits (Adam)."),
    seed: Seed = 0,
    out: Out = None,
    batch_size: BatchSize = None,
    num_workers: NumWorkers = 0,
    device: Device = "cpu",
    skip_bad: SkipBad = False,
    threads: Threads = None,
) -> None:
    """Fine-tune the image encoder (LoRA, IA3 or full) on a split's image-text pairs with the CLIP contrastive loss
    (text tower frozen), as a baseline for AAT: mean-R on --val-split after every epoch, on --report-split at the end.
    With --compare, every method of --methods learns from the same pairs (AAT-GA: a single-head scan, then the GA;
    AAT-BP: learned gates) and the table puts held-out mean-R beside trainable parameters (an AAT mask counts one bit
    per head) and training time.

    --data: a retrieval dataset with splits (Karpathy JSON, e.g. the retrieval.json of 'clipheads world make').
    --out: checkpoints (one folder per method), metrics.json or comparison.json. --op: the ablation operator of the
    AAT masks (--compare). --lr: AdamW with cosine decay, default 1e-3 for lora/ia3, 1e-5 for full. --epochs: each
    training image is seen once per epoch with one of its captions at random. --batch-size: image-text pairs per
    training step (contrastive batch, at least 2), also images per forward when scoring.
    """
    import clipheads
    from clipheads.baselines import CompareConfig, compare_baselines, parse_methods
    from clipheads.baselines.finetune import require_peft
    from clipheads.baselines.plots import plot_comparison, plot_epoch_curves
    from clipheads.cli.eval_cmd import package_versions
    from clipheads.errors import ClipHeadsError
    from clipheads.files import check_output_dir, write_bytes_atomic, write_json_atomic
    from clipheads.runtime import run_meta
    from clipheads.search import BPConfig, GAConfig, load_search_data

    if method not in ("lora", "ia3", "full"):
        raise ClipHeadsError(f"unknown --method {method!r}; choose lora, ia3 or full")
    rank = prefer_old(lora_rank, rank)
    if rank < 1:
        raise ClipHeadsError(f"--lora-rank must be at least 1 (got {rank})")
    name = f"lora-r{rank}" if method == "lora" else method
    chosen = parse_methods(methods) if compare else ["vanilla", name]
    require_peft(chosen)
    if not allow_same_split and train_split in (val_split, report_split):  # refuse before loading anything
        raise ClipHeadsError(f"the training split {train_split!r} is also the validation or held-out split; use "
                             "other splits (--val-split, --report-split) or pass --allow-same-split")
    check_output_dir(out, {"metrics.json": "json", "comparison.json": "json", "comparison.md": "text", "*.png": "png",
                           "checkpoints": "dir", **{method: "dir" for method in chosen}})
    started = time.perf_counter()
    from clipheads.cli import stages as cost
    from clipheads.cli.stages import Laps, command_stages

    splits = {"train": train_split, "val": val_split, "test": report_split}
    backend = clipheads.load(model, device=device)
    methods_work = _method_work(chosen, epochs, bp_epochs if bp_epochs is not None else epochs, population,
                                generations, backend.n_layers * backend.n_heads)
    stages = command_stages({**{f"{role} split": cost.PER_IMAGE * cost.GUESS_IMAGES for role in splits},
                             **{m: per * cost.GUESS_IMAGES for m, per in methods_work.items()},
                             "write results": cost.WRITE})
    sets = {}
    for role, split in splits.items():
        with stages.stage(f"{role} split"):
            sets[role] = load_search_data(backend, "retrieval", data, split, batch_size=batch_size,
                                          num_workers=num_workers, skip_bad=skip_bad, progress=True)
    n_train = len(sets["train"].pixels)
    for method, per_image in methods_work.items():
        stages.expect(method, per_image * n_train)
    stages.expect(chosen[0], methods_work[chosen[0]] * n_train
                  + cost.PER_IMAGE * (len(sets["val"].pixels) + len(sets["test"].pixels)))
    config = CompareConfig(methods=tuple(chosen), epochs=epochs, batch_size=batch_size, lr=lr, full_lr=full_lr,
                           op=op, eval_batch_size=batch_size, seed=seed,
                           ga=GAConfig(beta=ga_beta, population=population, generations=generations, seed=seed),
                           bp=BPConfig(beta=bp_beta, epochs=bp_epochs if bp_epochs is not None else epochs,
                                       batch_size=batch_size, lr=bp_lr, init_logit=1.5, seed=seed))
    out.mkdir(parents=True, exist_ok=True)
    result = compare_baselines(backend, sets["train"], sets["val"], sets["test"], config,
                               checkpoint_dir=out / "checkpoints" if compare else out,
                               allow_same_split=allow_same_split, on_method=Laps(stages).end)
    write = time.perf_counter()
    about = {"command": "finetune --compare" if compare else "finetune", "model": model, "data": str(data),
             "wall_time_s": time.perf_counter() - started, "versions": package_versions(), "run": run_meta()}
    if compare:
        write_json_atomic(out / "comparison.json", {**about, **result.to_dict()})
        write_bytes_atomic(out / "comparison.md", result.markdown().encode())
        figures = plot_comparison(result, out)
        stages.done("write results", time.perf_counter() - write)
        _print_table(result, "AAT against fine-tuning and PEFT")
        console.print(result.caption())
        console.print(f"-> {out}/comparison.json, {out}/comparison.md, " + ", ".join(str(f) for f in figures)
                      + f", {out}/checkpoints/")
        return
    vanilla, row = result.row("vanilla"), result.row(name)
    metrics = {**about, "method": name, "trainable_params": row.trainable_params,
               "total_params": row.extra["total_params"], "lr": row.extra["lr"], "train_split": result.train_split,
               "n_train_images": result.n_train_images, "n_train_texts": result.n_train_texts,
               "epochs": row.per_epoch, "train_wall_time_s": row.wall_time_s,
               "validation": {"split": result.val_split, "vanilla": vanilla.val_mean_recall,
                              "finetuned": row.val_mean_recall},
               "heldout": {"split": result.test_split, "metric": result.metric, "vanilla": vanilla.test_mean_recall,
                           "finetuned": row.test_mean_recall,
                           "change": row.test_mean_recall - vanilla.test_mean_recall},
               "checkpoint": row.extra.get("checkpoint"), "config": config.finetune_config(name).__dict__}
    write_json_atomic(out / "metrics.json", metrics)
    plot_epoch_curves(result, out / "epoch_curves.png")
    stages.done("write results", time.perf_counter() - write)
    table = Table(title=f"{name}: {row.trainable_params:,} trainable parameters, {result.n_train_images} training "
                        f"images ({result.train_split})")
    for column in ("epoch", "train loss", f"val mean-R ({result.val_split}, %)", "seconds"):
        table.add_column(column, justify="right")
    table.add_row("0", "", f"{100 * vanilla.val_mean_recall:.1f}", "")
    for e in row.per_epoch:
        table.add_row(str(e["epoch"]), f"{e['train_loss']:.4f}", f"{100 * e['val_mean_recall']:.1f}",
                      f"{e['seconds']:.1f}")
    console.print(table)
    console.print(f"held-out mean-R on {result.test_split}: vanilla {100 * vanilla.test_mean_recall:.1f} -> "
                  f"{name} {100 * row.test_mean_recall:.1f} ({100 * metrics['heldout']['change']:+.1f})")
    console.print(f"-> {out}/metrics.json, {out}/epoch_curves.png, checkpoint {row.extra.get('checkpoint')}")


def _method_work(methods: list[str], epochs: int, bp_epochs: int, population: int, generations: int,
                 heads: int) -> dict[str, float]:
    """Each method's expected seconds per training image: fine-tuning and AAT-BP epochs (a forward and a backward
    pass per image), AAT-GA's masks (the seeding scan's one per head, then population x generations); vanilla:
    nothing to train (its stage encodes the validation and held-out splits)."""
    from clipheads.cli import stages as cost

    work = {}
    for method in methods:
        if method == "vanilla":
            work[method] = 0.0
        elif method == "aat-ga":
            work[method] = cost.PER_MASK_IMAGE * (heads + population * generations)
        elif method == "aat-bp":
            work[method] = cost.PER_BP_EPOCH_IMAGE * bp_epochs
        else:
            work[method] = cost.PER_BP_EPOCH_IMAGE * epochs
    return work


def register(app: typer.Typer) -> None:
    """Add ``clipheads finetune``."""
    app.command("finetune")(finetune_command)
