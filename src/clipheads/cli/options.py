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
MemoryBudget = Annotated[str | None, typer.Option(
    help="Memory for the search's cache, e.g. 512MiB, 8GiB, 2GB (default: 80% of the memory free where the cache "
         "lives: the GPU's, else the host's). The plan (cached layers, image chunks, host or device) is printed and "
         "saved in summary.json; scores do not depend on it.")]
CachePrecision = Annotated[str | None, typer.Option(
    help="dtype of the search's cached residuals: fp32, bf16 or fp16 (default: the model's; lower saves memory and "
         "changes scores slightly).")]
