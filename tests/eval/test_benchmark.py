"""clip_benchmark's task names are read by one parser (``clipheads.eval.benchmark.task_name``) wherever a task is
named: the CLI's ``--task`` (tests/cli/test_task_aliases.py), ``clipheads.data.load_dataset`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipheads.data import load_dataset
from clipheads.errors import DataError
from clipheads.eval import FeatureCache, evaluate
from clipheads.eval.benchmark import CLIP_BENCHMARK_TASKS, task_name


def test_aliases_and_unknown_names():
    read = {alias: task_name(alias, ("retrieval", "zeroshot", "selection")) for alias in CLIP_BENCHMARK_TASKS}
    assert read == {"zeroshot_retrieval": "retrieval", "zeroshot_classification": "zeroshot",
                    "image_caption_selection": "selection"}
    with pytest.raises(DataError, match="unknown task 'bias'; choose one of retrieval, zeroshot .*zeroshot_retrieval"):
        task_name("bias", ("retrieval", "zeroshot"))


def test_load_dataset_and_evaluate_take_the_aliases(tiny_hf, tmp_path: Path):
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 60, 220)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [
        {"filename": f"{i}.png", "sentences": [{"raw": f"a {w} square"}]} for i, w in enumerate(["red", "green",
                                                                                                 "blue"])]}))
    dataset = load_dataset("zeroshot_retrieval", tmp_path / "karpathy.json")
    assert len(dataset) == 3
    assert evaluate("zeroshot_retrieval", tiny_hf, dataset, cache=FeatureCache()).metrics == evaluate(
        "retrieval", tiny_hf, dataset, cache=FeatureCache()).metrics
    with pytest.raises(DataError, match="unknown task 'captioning'"):
        load_dataset("captioning", tmp_path / "karpathy.json")
