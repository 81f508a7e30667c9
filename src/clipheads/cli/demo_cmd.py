"""``clipheads demo``: the whole pipeline on the bundled model, offline."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from clipheads.cli.options import ModelName, Out, Seed, Threads, with_load_options

console = Console()


def demo(
    out: Out = None,
    quick: bool = typer.Option(False, help="A reduced run (fewer images, shorter searches): about 1.5 minutes on 2 "
                                           "cores, the full demo about 6."),
    model: ModelName = None,
    seed: Seed = 0,
    threads: Threads = None,
) -> None:
    """Run everything on the bundled model: evaluation, head scan, AAT-GA/BP, cue analysis, layer scan, CCS.

    Writes one self-contained HTML report (open it in a browser) and JSON results to --out: report.html,
    atlas.html, summary.json, the masks and the generated world. The bundled model was trained on that world.
    """
    import torch
    from tqdm.auto import tqdm

    from clipheads.demo import DemoConfig, run_demo

    torch.manual_seed(seed)
    config = DemoConfig.quick(model=model, seed=seed) if quick else DemoConfig(model=model, seed=seed)
    n = torch.get_num_threads()
    console.print(f"clipheads demo{' --quick' if quick else ''}: {n} torch thread{'s' * (n != 1)} (--threads)")
    summary = run_demo(out, config, on_stage=lambda event: tqdm.write(str(event)))
    table = Table(title="held-out mean-R (masks searched on val_ood)")
    splits = ("val_ood", "test_ood", "test_iid", "test_anti")
    for col in ("mask", *splits, "ablated heads"):
        table.add_column(col)
    for name, scores in summary["mean_recall"].items():
        heads = summary["ablated"][name]
        shown = ", ".join(heads[:6]) + (f" (+{len(heads) - 6})" if len(heads) > 6 else "")
        table.add_row(name, *(f"{scores[s]:.1f}" for s in splits), shown or "-")
    console.print(table)
    console.print(f"report: {out / 'report.html'}  ({summary['wall_time_s']:.0f} s)")
    console.print(f"head atlas: {out / 'atlas.html'}  (linked from the report)")


def register(app: typer.Typer) -> None:
    app.command("demo")(with_load_options(demo))
