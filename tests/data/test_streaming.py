"""Scale of data: no reader decodes its images up front; evaluation decodes them batch by batch as it encodes."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipheads.data import image_loader, iter_pixels, load_classification, load_retrieval
from clipheads.eval import FeatureCache, evaluate_retrieval

from .test_sources import CAPTIONS, png, write_shard

N = 6


@pytest.fixture()
def decodes(monkeypatch) -> list[str]:
    """Every ``PIL.Image.open`` from now on (the one way any reader, ``datasets`` included, decodes an image)."""
    opened: list[str] = []
    real = Image.open

    def counting(source, *args, **kwargs):
        opened.append(str(getattr(source, "name", source)))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return opened


def sources(root: Path) -> dict[str, Path]:
    """The same N images with captions as a Karpathy JSON, a parquet file and tar / tar.gz shards."""
    import json

    import datasets

    (root / "img").mkdir()
    for i in range(N):
        (root / "img" / f"{i}.png").write_bytes(png(i))
    images = [{"filename": f"{i}.png", "filepath": "img", "sentences": [{"raw": c} for c in CAPTIONS[i]]}
              for i in range(N)]
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(N)], "captions": CAPTIONS},
                               features=features).to_parquet(root / "data.parquet")
    write_shard(root / "wds" / "0.tar", [{f"s{i}.png": png(i), f"s{i}.txt": "\n".join(CAPTIONS[i]).encode()}
                                         for i in range(N)])
    (root / "wdsgz").mkdir()
    with (root / "wds" / "0.tar").open("rb") as source, gzip.open(root / "wdsgz" / "0.tar.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    return {"karpathy": root / "karpathy.json", "hf": root / "data.parquet", "wds": root / "wds" / "0.tar",
            "wds.tar.gz": root / "wdsgz" / "0.tar.gz"}


@pytest.mark.parametrize("kind", ["karpathy", "hf", "wds", "wds.tar.gz"])
def test_readers_decode_nothing_and_evaluation_decodes_batch_by_batch(kind, tiny_hf, tmp_path: Path, decodes,
                                                                      monkeypatch):
    path = sources(tmp_path)[kind]
    decodes.clear()
    dataset = load_retrieval(path)
    assert len(dataset) == N and decodes == []  # references only: files, table cells, tar members

    encoded_after: list[int] = []  # images decoded so far, at each call of the image encoder
    encode = tiny_hf.encode_image

    def counting_encode(pixels, **kwargs):
        encoded_after.append(len(decodes))
        return encode(pixels, **kwargs)

    monkeypatch.setattr(tiny_hf, "encode_image", counting_encode)
    evaluate_retrieval(tiny_hf, dataset, batch_size=2, cache=FeatureCache())
    assert encoded_after == [2, 4, 6]  # never more decoded than the batches encoded so far


def test_an_image_folder_reader_decodes_nothing(tmp_path: Path, decodes):
    for i in range(N):
        (tmp_path / f"class{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"class{i % 3}" / f"{i}.png").write_bytes(png(i))
    decodes.clear()
    dataset = load_classification(tmp_path, templates=["a {}"])
    assert len(dataset) == N and decodes == []
    loader = image_loader(dataset.image_paths, lambda image: torch.zeros(1), batch_size=2)
    batches = iter_pixels(loader)
    next(batches)
    assert len(decodes) == 2  # the first batch only


def test_the_progress_bar_counts_images_and_shows_the_time_left(tmp_path: Path, monkeypatch):
    import clipheads.data.images as images

    bars = []

    class Recorded(images.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: list[int] = []
            bars.append(self)

        def update(self, n=1):
            self.seen.append(n)
            return super().update(n)

    monkeypatch.setattr(images, "tqdm", Recorded)
    paths = []
    for i in range(N):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(i))
    list(iter_pixels(image_loader(paths, lambda image: torch.zeros(1), batch_size=4), progress=True))
    (bar,) = bars
    assert (bar.total, bar.unit, bar.seen, bar.n) == (N, "img", [4, 2], N)  # a known total: tqdm shows rate and ETA
