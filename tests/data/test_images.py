"""Images stream through a DataLoader; a missing or corrupt image stops with its name, or is skipped and counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF

from clipheads.data import image_loader, iter_pixels, read_image
from clipheads.errors import DataError

from .conftest import write_images


def to_tensor(image):
    return TF.to_tensor(image.resize((8, 8)))


@pytest.fixture()
def files(tmp_path: Path) -> list[Path]:
    paths = write_images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really an image")
    return [paths[0], tmp_path / "corrupt.png", paths[1], tmp_path / "missing.png", paths[2]]


def test_batches_keep_file_order(files: list[Path]):
    good = [files[0], files[2], files[4]]
    batches = list(iter_pixels(image_loader(good, to_tensor, batch_size=2)))
    assert [b.indices.tolist() for b in batches] == [[0, 1], [2]]
    assert torch.equal(batches[0].pixels[1], to_tensor(read_image(good[1])))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_image_stops_with_its_name(files: list[Path], num_workers: int):
    with pytest.raises(DataError, match=r"cannot read image .*corrupt\.png.*--skip-bad") as info:
        list(iter_pixels(image_loader(files, to_tensor, batch_size=2, num_workers=num_workers)))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"missing\.png' does not exist"):
        list(iter_pixels(image_loader(files[2:], to_tensor, batch_size=2)))


def test_skip_bad_skips_and_counts(files: list[Path]):
    skipped: list[str] = []
    batches = list(iter_pixels(image_loader(files, to_tensor, batch_size=2), skip_bad=True, skipped=skipped))
    assert torch.cat([b.indices for b in batches]).tolist() == [0, 2, 4]
    assert skipped == [str(files[1]), str(files[3])]
