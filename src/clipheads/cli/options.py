"""Options that several commands share, written once (``Annotated`` types: ``device: Device = "cpu"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MODELS = ("'bundled' (shipped with clipheads), a Hugging Face id or folder, open_clip:ARCH (random init), "
          "open_clip:ARCH/TAG or open_clip:ARCH/path/to/checkpoint.pt.")
MODEL_HELP = "Model (default: bundled): " + MODELS
TASK_HELP = "retrieval (default metric mean_recall), selection (caption selection, acc) or zeroshot (acc1)."
SPLIT_HELP = "Split of a file with splits (Karpathy JSON); 'none' uses the whole file."
OP_HELP = "Ablation operator: identity (default), cls, zero, mean (head means of the search images) or scale."

DataPath = Annotated[Path, typer.Option("--data", "-d", help="Dataset file or folder.")]
ModelName = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
TaskName = Annotated[str, typer.Option("--task", "-t", help=TASK_HELP)]
ReportData = Annotated[Path | None, typer.Option(help="Held-out dataset file (default: --data; needed for tasks "
                                                      "whose files have no splits).")]
AllowSameSplit = Annotated[bool, typer.Option("--allow-same-split", help="Allow reporting on the searched split.")]
OperatorName = Annotated[str, typer.Option(help=OP_HELP)]
Alpha = Annotated[float | None, typer.Option(help="Factor of the scale operator.")]
Templates = Annotated[Path | None, typer.Option(help="zeroshot: prompt templates file.")]
NumWorkers = Annotated[int, typer.Option(help="DataLoader workers reading images.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")]
Precision = Annotated[str, typer.Option(help="Model weights: fp32, bf16 or fp16.")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip missing or corrupt images.")]
ImageColumn = Annotated[str | None, typer.Option(help="Hugging Face dataset: the image column (default: image).")]
TextColumn = Annotated[str | None, typer.Option(help="Hugging Face dataset: the caption column (default: caption, "
                                                     "captions, text ...; a string or a list per row).")]
LabelColumn = Annotated[str | None, typer.Option(help="Hugging Face dataset: the label column (default: label; "
                                                      "class names from its ClassLabel).")]
