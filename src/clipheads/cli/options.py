"""Options that several commands share, written once (``Annotated`` types: ``device: Device = "cpu"``).

Values are checked where they are parsed, before any model or image is loaded: integers with typer's own ``min=`` /
``max=``; floats with :func:`finite` (typer's range check lets ``inf`` through an open side and reports ``nan`` as
out of range); devices with :func:`check_device_option`. A bad value is click's usage error (exit code 2) naming the
option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

MODELS = ("'bundled' (shipped with clipheads), a Hugging Face id or folder, open_clip:ARCH (random init), "
          "open_clip:ARCH/TAG or open_clip:ARCH/path/to/checkpoint.pt, or a folder written by 'clipheads bake'.")
MODEL_HELP = "Model (default: bundled): " + MODELS
TASK_HELP = "retrieval (default metric mean_recall), selection (caption selection, acc) or zeroshot (acc1)."
SPLIT_HELP = "Split of a file with splits (Karpathy JSON); 'none' uses the whole file."
OP_HELP = "Ablation operator: identity (default), cls, zero, mean (head means of the search images) or scale."


def finite(min: float | None = None, max: float | None = None, above: float | None = None
           ) -> Callable[[float | None], float | None]:
    """A typer callback refusing a float that is nan or infinite, below ``min``, above ``max`` or not strictly
    greater than ``above`` (``None`` passes: the option was not given)."""
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number")
        if min is not None and value < min or max is not None and value > max:
            bounds = f"between {min:g} and {max:g}" if min is not None and max is not None else (
                f"at least {min:g}" if min is not None else f"at most {max:g}")
            raise typer.BadParameter(f"{value:g} is out of range: it must be {bounds}")
        if above is not None and value <= above:
            raise typer.BadParameter(f"{value:g} is out of range: it must be greater than {above:g}")
        return value

    return check


def check_device_option(value: str | None) -> str | None:
    """Typer callback of ``--device``: the same check as ``clipheads.load(device=...)``
    (:func:`clipheads.models.device.check_device`), as a usage error before anything is loaded."""
    from clipheads.errors import DeviceError
    from clipheads.models.device import check_device

    try:
        check_device(value)
    except DeviceError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


DataPath = Annotated[Path, typer.Option("--data", "-d", exists=True, help="Dataset file or folder.")]
ModelName = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
TaskName = Annotated[str, typer.Option("--task", "-t", help=TASK_HELP)]
ReportData = Annotated[Path | None, typer.Option(help="Held-out dataset file (default: --data; needed for tasks "
                                                      "whose files have no splits).", exists=True)]
AllowSameSplit = Annotated[bool, typer.Option("--allow-same-split", help="Allow reporting on the searched split.")]
OperatorName = Annotated[str, typer.Option(help=OP_HELP)]
Alpha = Annotated[float | None, typer.Option(help="Factor of the scale operator.", callback=finite())]
Templates = Annotated[Path | None, typer.Option(exists=True, help="zeroshot: prompt templates file.")]
NumWorkers = Annotated[int, typer.Option(min=0, help="DataLoader workers reading images.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ... (checked before anything is loaded).",
                                     callback=check_device_option)]


def check_precision_option(value: str | None) -> str | None:
    """Typer callback of ``--precision``: its canonical open_clip name (:func:`clipheads.precision.parse_precision`),
    or a usage error naming the known ones before anything is loaded."""
    from clipheads.errors import ClipHeadsError
    from clipheads.precision import parse_precision

    if value is None:
        return value
    try:
        return parse_precision(value).name
    except ClipHeadsError as exc:
        raise typer.BadParameter(str(exc)) from None


PRECISION_HELP = ("open_clip's precision: fp32; amp / amp_bf16 (fp32 weights, fp16 / bf16 autocast); fp16 / bf16 / "
                  "pure_fp16 / pure_bf16 (weights and inputs in that dtype, no autocast). Recorded in the results.")
Precision = Annotated[str, typer.Option(help=PRECISION_HELP, callback=check_precision_option)]
NoReport = Annotated[bool, typer.Option("--no-report", help="No held-out report (also spelled --report-split none, "
                                                            "kept for compatibility).")]


def with_precision(command: Callable) -> Callable:
    """A command run under its ``precision`` option's autocast on its ``device``'s type, with that precision
    recorded by :func:`clipheads.runtime.run_meta` (:func:`clipheads.precision.use_precision`); typer reads the
    wrapped function's options."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        from clipheads.precision import use_precision

        with use_precision(kwargs.get("precision"), kwargs.get("device") or "cpu"):
            return command(*args, **kwargs)

    return run
Pretrained = Annotated[str | None, typer.Option(help="open_clip pretrained tag or checkpoint file for --model ARCH "
                                                   "(as clip_benchmark's --model ViT-B-32 --pretrained TAG).")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip missing or corrupt images.")]
MEANS_HELP = ("Head means for the mean operator: per-position (each head's mean over the images at each token "
              "position, the usual mean ablation) or pooled (over images and positions; foldable by bake).")
MeansKind = Annotated[str, typer.Option("--means", help=MEANS_HELP)]


def _apply_threads(threads: int | None) -> int | None:
    """Option callback: click runs it while parsing (also when --threads is not given), before the command."""
    from clipheads.runtime import set_threads

    set_threads(threads)
    return threads


THREADS_HELP = ("torch CPU threads (default 1, or $CLIPHEADS_THREADS / $OMP_NUM_THREADS when set; 0 = every core "
                "this process may use). More threads than free cores cost CPU time on a shared machine: see README.")
# Applied by its callback while the command line is parsed: a command only declares ``threads: Threads = None``.
# is_eager: set before the other options are checked (an input path that does not exist is refused after it).
Threads = Annotated[int | None, typer.Option("--threads", min=0, callback=_apply_threads, show_default=False,
                                             is_eager=True, help=THREADS_HELP)]


ImageColumn = Annotated[str | None, typer.Option(help="Hugging Face dataset: the image column (default: image).")]
TextColumn = Annotated[str | None, typer.Option(help="Hugging Face dataset: the caption column (default: caption, "
                                                     "captions, text ...; a string or a list per row).")]
LabelColumn = Annotated[str | None, typer.Option(help="Hugging Face dataset: the label column (default: label; "
                                                      "class names from its ClassLabel).")]


MemoryBudget = Annotated[str | None, typer.Option(
    help="Memory for what the command caches, e.g. 512MiB, 8GiB, 2GB (default: 80% of the memory free where the "
         "cache lives: the GPU's, else the host's): the search's residual cache and its split's pixels (float32, "
         "exact uint8 codes or re-read from disk), the head contributions of describe/ccs (all in memory or "
         "streamed in image chunks). The plan is printed and saved with the results; results do not depend on it.")]
CachePrecision = Annotated[str | None, typer.Option(
    help="dtype of the search's cached residuals: fp32, bf16 or fp16 (default: the model's; lower saves memory and "
         "changes scores slightly).")]


def old_spelling(name: str, replaced_by: str, **checks):
    """A hidden option under an option's old spelling, kept for one release; its value (when given) wins over the
    new option's (:func:`prefer_old`). ``checks`` are typer's (``min=``, ``exists=``)."""
    return typer.Option(None, name, hidden=True, help=f"Old spelling of {replaced_by}, kept for one release.",
                        **checks)


def prefer_old(new, old):
    """The value of an option given under its new or (see :func:`old_spelling`) its old spelling."""
    return new if old is None else old


SkewK = Annotated[int, typer.Option("--skew-k", min=1, help="bias: K of MaxSkew@K.")]
ImageRoot = Annotated[Path | None, typer.Option("--image-root", exists=True, help="Folder the dataset file's image "
                                                "paths are relative to (default: the file's own folder).")]
