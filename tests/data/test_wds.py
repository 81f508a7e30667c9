"""Gzip-compressed webdataset shards (``.tar.gz``, ``.tgz``) are streamed, never unpacked, and read as the plain
``.tar`` shards they compress."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from clipheads.data import image_loader, iter_pixels, load_classification, load_retrieval, read_image
from clipheads.data.sources import detect_source
from clipheads.data.wds import TarMember
from clipheads.errors import DataError
from clipheads.eval import FeatureCache, evaluate_retrieval, evaluate_zeroshot

from .test_sources import CAPTIONS, png, write_shard


def plain_and_gzip(root: Path, samples_of, suffix: str = ".tar.gz") -> tuple[Path, Path]:
    """The same two shards under ``root/plain/test/`` and gzip-compressed under ``root/gz/test/``."""
    for shard in range(2):
        plain = root / "plain" / "test" / f"{shard}.tar"
        write_shard(plain, samples_of(shard))
        packed = root / "gz" / "test" / f"{shard}{suffix}"
        packed.parent.mkdir(parents=True, exist_ok=True)
        with plain.open("rb") as source, gzip.open(packed, "wb") as target:
            shutil.copyfileobj(source, target)
    return root / "plain", root / "gz"


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzip_shards_equal_the_plain_tar(tiny_hf, tmp_path: Path, suffix: str):
    plain, packed = plain_and_gzip(
        tmp_path, lambda shard: [{f"s{i:04d}.png": png(i), f"s{i:04d}.txt": "\n".join(CAPTIONS[i]).encode()}
                                 for i in range(3 * shard, 3 * shard + 3)], suffix)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert detect_source(packed, "test") == "wds" and detect_source(packed / "test" / f"0{suffix}") == "wds"
    expected = evaluate_retrieval(tiny_hf, load_retrieval(plain, split="test"), cache=FeatureCache()).metrics
    for given in (packed, packed / "test" / f"{{0..1}}{suffix}"):
        dataset = load_retrieval(given, split="test")
        assert dataset.captions == CAPTIONS and all(ref.compressed for ref in dataset.image_paths)
        assert evaluate_retrieval(tiny_hf, dataset, cache=FeatureCache()).metrics == expected
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing unpacked to disk


def test_gzip_members_read_in_any_order_are_the_plain_bytes(tmp_path: Path):
    plain, packed = plain_and_gzip(tmp_path, lambda shard: [{f"s{i:04d}.png": png(i), f"s{i:04d}.cls": b"0"}
                                                            for i in range(3 * shard, 3 * shard + 3)])
    gz = load_classification(packed, split="test", templates=["a {}"]).image_paths
    tar = load_classification(plain, split="test", templates=["a {}"]).image_paths
    assert all(isinstance(ref, TarMember) for ref in gz)
    for n in [5, 0, 2, 1, 4, 3, 0]:  # backwards restarts the stream, forwards skips ahead
        assert gz[n].read_bytes() == tar[n].read_bytes() == png(n)
    gz[5].read_bytes()  # this process now holds an open stream, which forked workers must not share

    def mean_colour(image):
        return torch.tensor(image.resize((1, 1)).getpixel((0, 0)), dtype=torch.float32)

    for workers in (0, 2):  # DataLoader workers (forked) each stream the shards on their own
        batches = list(iter_pixels(image_loader(gz, mean_colour, batch_size=2, num_workers=workers)))
        assert [i for b in batches for i in b.indices.tolist()] == list(range(6))
        expected = torch.stack([mean_colour(read_image(ref)) for ref in tar])
        assert torch.equal(torch.cat([b.pixels for b in batches]), expected)


def test_a_corrupt_gzip_shard_is_one_line(tmp_path: Path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "0.tar.gz").write_bytes(gzip.compress(b"not a tar archive at all" * 40)[:-8])
    with pytest.raises(DataError, match=r"cannot read shard '.*0\.tar\.gz' as a gzip-compressed tar"):
        load_retrieval(tmp_path, split="test")


def test_gzip_classification_shards_equal_plain(tiny_hf, tmp_path: Path):
    plain, packed = plain_and_gzip(tmp_path, lambda shard: [{f"s{i:04d}.png": png(i), f"s{i:04d}.cls": str(i % 3)
                                                             .encode()} for i in range(3 * shard, 3 * shard + 3)])
    for root in (plain, packed):
        (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    expected = evaluate_zeroshot(tiny_hf, load_classification(plain, split="test", templates=["a {} square"]),
                                 cache=FeatureCache()).metrics
    ours = evaluate_zeroshot(tiny_hf, load_classification(packed, split="test", templates=["a {} square"]),
                             cache=FeatureCache()).metrics
    assert ours == pytest.approx(expected, nan_ok=True)
