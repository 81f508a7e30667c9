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
MODEL_HELP = "Model (default: bundled; captioner generate: the model the captioner was trained on): " + MODELS
SPLIT_HELP = "Split of a file with splits (Karpathy JSON); 'none' uses the whole file."


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


def check_data_option(value: Path | None) -> Path | None:
    """Typer callback of ``--data`` / ``--report-data``: a path that exists, a shard pattern or a Hugging Face Hub
    dataset id (:func:`clipheads.data.sources.detect_source`), else a usage error before anything is loaded."""
    from clipheads.data.sources import detect_source
    from clipheads.errors import DataError

    if value is None:
        return value
    try:
        detect_source(value)
    except DataError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _search_tasks() -> tuple[str, ...]:
    from clipheads.search.tasks import TASKS

    return TASKS


DATA_HELP = ("Dataset: a file or folder of the kind the command reads (retrieval JSON or CSV with splits, a folder "
             "of images, an ImageFolder, a Hugging Face dataset (save_to_disk folder, parquet, or a Hub id org/name "
             "read from the local cache when offline), webdataset shards (file, folder or pattern), a world folder of "
             "'clipheads world make'; see the command's help).")
DataPath = Annotated[Path, typer.Option("--data", "-d", callback=check_data_option, help=DATA_HELP)]


def _default_model(ctx, param, value):
    """--model's value: 'bundled' when not given, except for captioner generate (the captioner's own model)."""
    return value if value is not None or command_path(ctx) == "captioner generate" else "bundled"


ModelName = Annotated[str | None, typer.Option("--model", "-m", show_default=False, callback=_default_model,
                                               help=MODEL_HELP)]
ReportData = Annotated[Path | None, typer.Option(help="Held-out dataset file (default: --data; needed for tasks "
                                                      "whose files have no splits).", callback=check_data_option)]
AllowSameSplit = Annotated[bool, typer.Option("--allow-same-split", help="Allow reporting (finetune: also "
                                                                         "validating) on the split searched or "
                                                                         "trained on.")]
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
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip (and count) missing or corrupt images instead of "
                                                          "stopping.")]
AttnImplementation = Annotated[str | None, typer.Option(
    "--attn-implementation", help="transformers models: the attention implementation to load with (sdpa, eager ...; "
                                  "from_pretrained's attn_implementation).")]
Revision = Annotated[str | None, typer.Option(help="transformers models: the Hub revision (branch, tag or commit).")]
# not --cache-dir: eval's --cache-dir is its feature cache
ModelCacheDir = Annotated[Path | None, typer.Option(
    file_okay=False, help="Where downloaded model weights are cached (from_pretrained's / open_clip's cache_dir; made "
                          "if missing).")]


def with_load_options(command: Callable) -> Callable:
    """``command`` with the options ``--attn-implementation``, ``--revision``, ``--model-cache-dir`` and
    ``--pretrained``: every ``clipheads.load`` of a model by name inside it takes them
    (:func:`clipheads.models.load_options`)."""
    import functools
    import inspect

    extra = {"attn_implementation": AttnImplementation, "revision": Revision, "model_cache_dir": ModelCacheDir,
             "pretrained": Pretrained}

    @functools.wraps(command)
    def run(*args, attn_implementation=None, revision=None, model_cache_dir=None, pretrained=None, **kwargs):
        from clipheads.models import load_options

        with load_options(attn_implementation=attn_implementation, revision=revision, cache_dir=model_cache_dir,
                          pretrained=pretrained):
            return command(*args, **kwargs)

    signature = inspect.signature(command, eval_str=True)
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
             for name, annotation in extra.items()]
    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *added])
    run.__annotations__ = {**command.__annotations__, **extra}
    return run


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
GroupColumn = Annotated[str | None, typer.Option(help="bias, Hugging Face dataset: the column naming each image's "
                                                      "counterfactual set (default: counterfactual_set).")]
AttributeColumns = Annotated[str | None, typer.Option(help="bias, Hugging Face dataset: the attribute value columns, "
                                                           "comma-separated (default: each X with an X_type column, "
                                                           "as SocialCounterfactuals' a1,a2).")]
Queries = Annotated[Path | None, typer.Option(exists=True, help="bias: neutral queries, one per line (default: the "
                                                                "JSON's queries; for a Hugging Face dataset its "
                                                                "captions less their attribute values).")]


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


# ------------------------------------------------------------------------ one meaning per option, across commands
# Options that several commands take, each defined once: the same type, default and help everywhere (checked by
# tests/cli/test_bad_inputs.py, which walks the app). Where the value a command uses when the option is not given
# depends on the command, the option's default is None, its help states the rule, and :func:`per_command` computes
# the value while the command line is parsed (from the option's table of command defaults, keyed by the command's
# path such as ``"world train"``).

def command_path(ctx) -> str:
    """The command a click context runs, without the program: ``"scan"``, ``"world train"``."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names)) or (ctx.info_name if ctx is not None else "")


def per_command(defaults: dict[str, object], minimum: dict[str, int] | None = None,
                then: Callable | None = None) -> Callable:
    """A typer callback giving an option its command's default (``defaults[command]``; None where the command has
    none) when it is not given, refusing values below the command's ``minimum``, then applying ``then`` (another
    check, e.g. :func:`finite`)."""
    def callback(ctx, param, value):
        command = command_path(ctx)
        if value is None:
            value = defaults.get(command)
        low = (minimum or {}).get(command)
        if low is not None and value is not None and value < low:
            raise typer.BadParameter(f"{value} is out of range: {command} needs at least {low}")
        return value if then is None else then(value)

    return callback


def split_or_whole(split: str | None) -> str | None:
    """A ``--split`` value as the readers take it: ``None`` (the whole file) for ``none``, ``all`` or nothing."""
    return None if split is None or split.lower() in ("none", "all", "") else split


# --out
ONE_FILE = {"atlas": ".html", "eval": ".json", "mask": ".json"}  # commands that write one file, not a folder
PRINT_ONLY = ("patch", "captioner generate")  # commands that print their result and write it only with --out


def default_out(command: str) -> Path | None:
    """Where a command writes when ``--out`` is not given: ``clipheads-<command>/`` (a folder), or
    ``clipheads-<command>.<json|html>`` for the commands that write one file; None for those that only print."""
    if command in PRINT_ONLY:
        return None
    return Path("clipheads-" + command.replace(" ", "-") + ONE_FILE.get(command, ""))


def _out(ctx, param, value):
    return default_out(command_path(ctx)) if value is None else value


OUT_HELP = ("Where to write the results (default: clipheads-<command>/, or clipheads-<command>.json / .html for "
            "eval, mask and atlas, which write one file; patch and captioner generate only print unless given a "
            "JSON file here).")
Out = Annotated[Path | None, typer.Option("--out", "-o", callback=_out, show_default=False, help=OUT_HELP)]

# --batch-size
BATCH_SIZES = {"atlas": 32, "captioner generate": 32, "ccs": 32, "describe": 32, "prune": 32, "mask": 32,
               "eval": 64, "layers": 64, "scan": 64, "search": 64, "finetune": 64, "captioner train": 32,
               "world train": 128}
BatchSize = Annotated[int | None, typer.Option(
    min=1, callback=per_command(BATCH_SIZES, minimum={"world train": 2, "finetune": 2}), show_default=False,
    help="Examples per forward pass or training step: images (scan, search, layers: images x stacked masks), "
         "image-text pairs when training contrastively, captions for captioner train (default: 128 for world "
         "train, 64 for eval, scan, search, layers and finetune, 32 otherwise).")]

# --seed
Seed = Annotated[int, typer.Option(min=0, help="Random seed of everything the command draws (image subsets, text "
                                                "pools, initial weights, batch order, GA populations, the world); "
                                                "the same seed gives the same result.")]

# --epochs
EPOCHS = {"captioner train": 10, "finetune": 3}  # search: None (bp's default, 10)
Epochs = Annotated[int | None, typer.Option(
    min=0, callback=per_command(EPOCHS, minimum={"captioner train": 1, "finetune": 1}), show_default=False,
    help="Passes over the training data (default: 10 for captioner train and for search's bp, 3 for finetune).")]

# --lr
LEARNING_RATES = {"captioner train": 1e-3, "world train": 1e-3}  # finetune and search: None (their method's)
LearningRate = Annotated[float | None, typer.Option(
    callback=per_command(LEARNING_RATES, then=finite(above=0)), show_default=False,
    help="Peak learning rate (AdamW; default 1e-3, finetune's full 1e-5, search's bp 0.2 for the gate logits "
         "with Adam).")]

# --population, --generations (genetic search)
Population = Annotated[int | None, typer.Option(
    min=2, callback=per_command({"search": 32, "finetune": 16}), show_default=False,
    help="Genetic search (search's ga, finetune's aat-ga): population size (default 32 for search, 16 for "
         "finetune).")]
Generations = Annotated[int | None, typer.Option(
    min=1, callback=per_command({"search": 20, "finetune": 8}), show_default=False,
    help="Genetic search (search's ga, finetune's aat-ga): generations (default 20 for search, 8 for finetune).")]

# --max-images
MaxImages = Annotated[int | None, typer.Option(
    min=2, callback=per_command({"atlas": 200, "ccs": 2000, "describe": 2000}), show_default=False,
    help="Use a fixed random subset of at most this many images (default 2000; atlas: 200).")]

# --split
SPLITS = {"eval": "test", "captioner train": "train", "layers": "none"}
Split = Annotated[str | None, typer.Option(
    callback=per_command(SPLITS), show_default=False,
    help="Split of a file with splits (Karpathy JSON, CSV with a split column); 'none' or 'all' uses the whole "
         "file (default: test for eval, train (with restval) for captioner train, the whole file otherwise).")]

def _eval_tasks() -> tuple[str, ...]:
    from clipheads.eval import EVALUATORS

    return tuple(EVALUATORS)


def _task(ctx, param, value):
    """--task's value: the command's default when not given (:data:`TASKS`), a clip_benchmark alias resolved through
    the one parser (:func:`clipheads.eval.benchmark.task_name`), a task the command does not run a usage error."""
    from clipheads.errors import ClipHeadsError
    from clipheads.eval.benchmark import task_name

    value = per_command(TASKS)(ctx, param, value)
    if value is None:
        return value
    try:
        return task_name(value, _eval_tasks() if command_path(ctx) == "eval" else _search_tasks())
    except ClipHeadsError as exc:
        raise typer.BadParameter(str(exc)) from None


# --task
TASKS = {"scan": "retrieval", "search": "retrieval", "layers": "selection"}
TaskName = Annotated[str | None, typer.Option(
    "--task", "-t", callback=_task, show_default=False,
    help="retrieval (Karpathy JSON, COCO captions JSON, CSV image,caption; metric mean_recall), selection "
         "(JSON/CSV image + candidates + answer; acc), zeroshot (ImageFolder or CSV image,label; acc1), and for "
         "eval compositional (JSON pairs) or bias (counterfactual JSON); clip_benchmark's zeroshot_retrieval, "
         "zeroshot_classification and image_caption_selection name the first three (default: retrieval for scan "
         "and search, selection for layers; eval needs it).")]


# --op, --alpha
OPERATORS = {"bake": "zero", "prune": "scale"}
OperatorName = Annotated[str | None, typer.Option(
    callback=per_command(OPERATORS, then=lambda value: value if value is not None else "identity"),
    show_default=False,
    help="Ablation operator: identity, cls, zero, mean (head means: of the search images, or stored in the mask by "
         "'clipheads mask --means-from') or scale (outputs times --alpha); bake folds zero, mean or scale into the "
         "weights, prune applies scale or mean (default: identity; bake: zero; prune: scale).")]
Alpha = Annotated[float | None, typer.Option(
    callback=per_command({"prune": 0.0}, then=finite()), show_default=False,
    help="Factor of the scale operator: a head's output times alpha, 0 removes it (prune's default: 0).")]

# --metric
Metric = Annotated[str | None, typer.Option(help="Metric to maximise and report (default per task: mean_recall, "
                                                 "acc, acc1).")]

# --templates (a file or a preset name, so not checked as a path)
Templates = Annotated[Path | None, typer.Option(
    help="zeroshot: prompt templates, one with {} per line, or a preset: openai (CLIP's 80, as clip_benchmark), "
         "default (clipheads' set, used when not given).")]

# --heads, --layers
Heads = Annotated[str | None, typer.Option(help="Heads, e.g. L3.H7,L5.H1 (0-based): the heads to draw, patch or "
                                                "ablate.")]
Layers = Annotated[str | None, typer.Option(help="Layers, e.g. '0-2,5' (ranges inclusive, 0-based): whose heads to "
                                                 "describe, score or show (default: all), or for mask whose heads "
                                                 "to ablate (default: none).")]

# --mask, --ccs, --descriptions, --means-from, --captioner, --images
MaskFile = Annotated[Path | None, typer.Option("--mask", exists=True, help="Head mask JSON (from 'clipheads mask', "
                                                                           "scan or search) to ablate.")]
CCSFile = Annotated[Path | None, typer.Option("--ccs", exists=True, help="ccs.json of 'clipheads ccs' (concept "
                                                                         "label and CCS per head).")]
DescriptionsFile = Annotated[Path | None, typer.Option(
    "--descriptions", exists=True, help="descriptions.json of 'clipheads describe' (TextSpan texts per head; ccs "
                                        "skips TextSpan with it).")]
MeansFrom = Annotated[Path | None, typer.Option(
    "--means-from", exists=True, help="Folder of reference images whose mean head outputs the mean operator uses "
                                      "(mask stores them in the mask).")]
Captioner = Annotated[Path | None, typer.Option(
    "--captioner", "-c", exists=True,
    help="A captioner folder written by 'clipheads captioner train' (reads the CLIP model's image embedding), or a "
         "Hugging Face VisionEncoderDecoderModel folder with a CLIP vision encoder (its own encoder's layers are "
         "cancelled by layers).")]
Images = Annotated[list[Path] | None, typer.Option("--images", "-i", exists=True,
                                                   help="Image file or folder; repeat for more.")]

# caption generation
Beams = Annotated[int, typer.Option(min=1, help="Beam width of caption generation (1 = greedy).")]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Most tokens generated per caption, after any prefix.")]

# held-out splits
SearchSplit = Annotated[str, typer.Option(help="Split to scan or search on (search's bp trains on its pairs). "
                                               + SPLIT_HELP)]
REPORT_SPLIT_HELP = ("Held-out split of the final result; for scan and search 'none' is the whole --report-data "
                     "file, or without --report-data no report (the old spelling of --no-report).")
ReportSplit = Annotated[str, typer.Option(help=REPORT_SPLIT_HELP)]
