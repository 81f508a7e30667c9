"""``clipheads bake``: fold a head mask into a model's weights and save the model, ready for ``clipheads.load``."""

from __future__ import annotations

import typer
from rich.console import Console

from clipheads.cli.options import Alpha, Device, MaskFile, ModelName, OperatorName, Out

console = Console()


def bake_command(
    mask: MaskFile = ...,
    out: Out = None,
    op: OperatorName = None,
    alpha: Alpha = None,
    model: ModelName = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model that an earlier bake wrote to --out "
                                                              "(a folder of other files is never replaced)."),
    device: Device = "cpu",
) -> None:
    """Fold a zero/mean/scale ablation into the model's weights and save it with its tokenizer, image processor and
    config: 'clipheads ... --model OUT' and clipheads.load(OUT) read it back (plain transformers / open_clip model,
    no hooks, zero overhead)."""
    import clipheads
    from clipheads.errors import OperatorError
    from clipheads.interventions import BAKEABLE
    from clipheads.models.saving import check_output_folder

    if op not in BAKEABLE:
        raise OperatorError(f"--op {op!r} cannot be folded into weights; choose one of {', '.join(BAKEABLE)} "
                            "(identity and cls depend on each token: use --mask with eval/search instead)")
    if alpha is not None and op != "scale":
        raise OperatorError("--alpha is the factor of --op scale only")
    check_output_folder(out, overwrite)
    if not mask.is_file():
        raise clipheads.MaskError(f"mask file {str(mask)!r} does not exist")
    backend = clipheads.load(model, device=device)
    head_mask = clipheads.HeadMask.load(mask, backend)
    if head_mask.n_ablated == 0:
        raise clipheads.MaskError(f"{mask} ablates no head: baking it would save the model unchanged")
    baked = clipheads.bake(backend, head_mask, op=op, alpha=alpha)
    folder = clipheads.save(baked, out, overwrite=overwrite)
    console.print(f"{backend.name}: {head_mask.n_ablated} head(s) baked with {op}: {', '.join(head_mask.ablated)}",
                  soft_wrap=True)
    console.print(f"saved to {folder} (load it with --model {folder})", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("bake")(bake_command)
