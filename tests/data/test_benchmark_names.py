"""clip_benchmark dataset names built by clip_benchmark's own builder from local files, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipheads.data import load_classification, load_retrieval
from clipheads.data.benchmark import load_clip_benchmark_classification, load_clip_benchmark_retrieval
from clipheads.errors import DataError
from clipheads.eval import FeatureCache, evaluate_retrieval

from .test_sources import CAPTIONS, WNIDS, png


def test_flickr30k_by_name_equals_its_files(tiny_hf, tmp_path: Path):
    root = tmp_path / "flickr30k"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.jpg").write_bytes(png(i))
    lines = ["image,caption"] + [f"{i}.jpg,{c}" for i, caps in enumerate(CAPTIONS) for c in caps]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    by_name = load_clip_benchmark_retrieval("flickr30k", root, "test")
    assert by_name.captions == CAPTIONS and by_name.image_paths[0] == root / "0.jpg"
    files = load_retrieval(root, split="test")
    assert evaluate_retrieval(tiny_hf, by_name, cache=FeatureCache()).metrics == \
        evaluate_retrieval(tiny_hf, files, cache=FeatureCache()).metrics


def test_missing_dataset_is_one_line_and_nothing_is_downloaded(tmp_path: Path):
    with pytest.raises(DataError, match=r"clip_benchmark expects 'flickr30k' \(split 'test'\) at .*missing; "
                                        "clipheads does not download"):
        load_clip_benchmark_retrieval("flickr30k", tmp_path / "missing", "test")
    (tmp_path / "flickr").mkdir()
    with pytest.raises(DataError, match="with flickr30k_test_karpathy.txt; clipheads does not download"):
        load_clip_benchmark_retrieval("flickr30k", tmp_path / "flickr", "test")
    assert list((tmp_path / "flickr").iterdir()) == []  # no empty file left by a failed wget
    with pytest.raises(DataError, match="clip_benchmark found no 'cifar10' in .*clipheads does not download") as info:
        load_clip_benchmark_classification("cifar10", tmp_path / "flickr", "test")
    assert "download=True" not in str(info.value)  # torchvision's advice, an option clipheads does not have


def test_imagenet1k_by_name_uses_clip_benchmark_classnames_and_templates(tmp_path: Path):
    import torch

    classes = [2, 0, 1, 1, 0, 2]
    for n, c in enumerate(classes):
        (tmp_path / "val" / WNIDS[c]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / WNIDS[c] / f"ILSVRC2012_val_{n + 1:08d}.JPEG").write_bytes(png(n))
    torch.save(({w: (w,) for w in WNIDS}, [WNIDS[c] for c in classes]), tmp_path / "meta.bin")
    dataset = load_clip_benchmark_classification("imagenet1k", tmp_path, "test")
    assert len(dataset.classnames) == 1000 and dataset.classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert len(dataset.templates) == 80 and dataset.templates[0] == "a bad photo of a {}."
    folders = load_classification(tmp_path / "val", templates="openai")
    assert sorted(zip(map(str, dataset.image_paths), dataset.labels, strict=True)) == \
        sorted(zip(map(str, folders.image_paths), folders.labels, strict=True))
