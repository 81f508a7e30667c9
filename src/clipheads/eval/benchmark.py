"""Results that clip_benchmark reads: its task names and the JSON its ``clip_benchmark build`` turns into a CSV.

clip_benchmark (``clip_benchmark/cli.py``, ``run``) writes one JSON per run with the keys ``dataset`` (a string),
``model``, ``pretrained``, ``task``, ``metrics`` and ``language``; ``build`` reads ``metrics`` into columns and
joins ``model`` and ``pretrained``. Metric keys are already clip_benchmark's (``acc1``, ``acc5``,
``mean_per_class_recall``, ``image_retrieval_recall@5``, ``text_retrieval_recall@5``; ``acc``, ``image_acc``,
``text_acc`` for caption selection).
"""

from __future__ import annotations

from pathlib import Path

from clipheads.errors import DataError

#: clip_benchmark task name -> clipheads task name (``--task`` accepts both).
CLIP_BENCHMARK_TASKS = {
    "zeroshot_retrieval": "retrieval",
    "zeroshot_classification": "zeroshot",
    "image_caption_selection": "selection",
}
#: clipheads task -> the clip_benchmark task its result is filed under (bias has none).
TASK_FOR_CLIP_BENCHMARK = {
    "retrieval": "zeroshot_retrieval",
    "zeroshot": "zeroshot_classification",
    "selection": "image_caption_selection",
    "compositional": "image_caption_selection",  # Winoground-style: acc, image_acc, text_acc
}


def task_name(task: str, known: tuple[str, ...] | list[str]) -> str:
    """The clipheads task for ``task``, which may be a clip_benchmark task name; one-line error if unknown."""
    task = CLIP_BENCHMARK_TASKS.get(task, task)
    if task not in known:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(known)} (or clip_benchmark's "
                        f"{', '.join(CLIP_BENCHMARK_TASKS)})")
    return task


def model_and_pretrained(model: str) -> tuple[str, str]:
    """clip_benchmark's ``(model, pretrained)`` for a clipheads model name: ``open_clip:ViT-B-32/laion2b_s34b_b79k``
    -> ``("ViT-B-32", "laion2b_s34b_b79k")``; a Hugging Face id, a folder or ``bundled`` -> ``(name, "")``. A tag
    given apart (``--model ViT-B-32 --pretrained TAG``: :func:`clipheads.models.load_options`) is the pretrained."""
    from clipheads.models import current_load_options
    from clipheads.models.openclip import PREFIX, parse_open_clip_name

    given = str(current_load_options().get("pretrained") or "")
    if model.startswith(PREFIX):
        arch, tag = parse_open_clip_name(model)
        return arch, tag or given
    return model, given


def benchmark_dataset_name(name: str) -> str:
    """clip_benchmark's name of a dataset: its ``wds_*`` repositories and folders (``wds_vtab-cifar10``) are
    ``wds/vtab/cifar10`` there (as ``clip_benchmark eval --dataset wds/vtab/cifar10`` writes it); others as given."""
    return "wds/" + name.removeprefix("wds_").replace("-", "/") if name.startswith("wds_") else name


def clip_benchmark_result(task: str, dataset: str, model: str, metrics: dict[str, float],
                          language: str = "en") -> dict | None:
    """The result of a clipheads ``task`` as clip_benchmark writes it, or ``None`` for a task it has none of."""
    if task not in TASK_FOR_CLIP_BENCHMARK:
        return None
    name, pretrained = model_and_pretrained(model)
    return {"dataset": benchmark_dataset_name(str(dataset)), "model": name, "pretrained": pretrained,
            "task": TASK_FOR_CLIP_BENCHMARK[task],
            "metrics": dict(metrics), "language": language}


def clip_benchmark_path(out: str | Path) -> Path:
    """Where the clip_benchmark result goes beside clipheads' own JSON: ``clipheads-eval.clip_benchmark.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.clip_benchmark.json")
