from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image


def write_images(folder: Path, names: list[str], size: int = 24) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (30 * i % 256, 200 - 20 * i % 200, 90)).save(path)
        paths.append(path)
    return paths


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    write_images(tmp_path / "img", [f"{i}.png" for i in range(4)])
    return tmp_path


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch) -> None:
    """Hugging Face datasets converts parquet into its cache: keep that in the test's folder, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
