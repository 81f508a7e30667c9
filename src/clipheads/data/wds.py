"""webdataset shards in clip_benchmark's layout (its ``wds_*`` repositories), read in place.

``root/{split}/0.tar, 1.tar ...`` with samples of an image (``.webp/.png/.jpg/.jpeg``) and ``.txt`` captions (one per
line, retrieval) or a ``.cls`` class id (classification); ``root/classnames.txt`` and
``root/zeroshot_classification_templates.txt`` beside. Members are grouped into samples by webdataset's own key
rule (``webdataset.tariterators.base_plus_ext``); patterns are expanded as webdataset does
(``webdataset.shardlists.expand_urls``), then globbed. Each shard's headers are read once, in order (nothing is
unpacked to disk); an image is then a :class:`TarMember` that a DataLoader worker reads by offset, so images stream
and are never all held in memory.

Gzip-compressed shards (``.tar.gz``, ``.tgz``) are read as a stream too: gzip cannot seek to an offset, so each
process keeps one open decompressing stream per shard and reads its members in order, skipping forward over the
others (:func:`_gzip_stream`); a worker thus decompresses a shard once, holds one member at a time, and writes
nothing to disk.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import tarfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from clipheads.data.images import ImageRef
from clipheads.errors import DataError

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's order
SHARD_GLOBS = ("*.tar", "*.tar.gz", "*.tgz")
OPEN_STREAMS = 4  # gzip streams a process keeps open (one per shard being read)
_STREAMS: OrderedDict[tuple[int, Path], gzip.GzipFile] = OrderedDict()


def is_gzip_shard(path: Path) -> bool:
    return path.name.lower().endswith((".tar.gz", ".tgz"))


def _gzip_stream(shard: Path) -> gzip.GzipFile:
    """This process's open decompressing stream of ``shard`` (a forked DataLoader worker opens its own)."""
    pid = os.getpid()
    for key in [key for key in _STREAMS if key[0] != pid]:  # a parent's streams, inherited by fork: not ours
        del _STREAMS[key]
    key = (pid, shard)
    if key in _STREAMS:
        _STREAMS.move_to_end(key)
        return _STREAMS[key]
    while len(_STREAMS) >= OPEN_STREAMS:
        _STREAMS.popitem(last=False)[1].close()
    _STREAMS[key] = gzip.open(shard, "rb")  # noqa: SIM115 (kept open across reads; closed when evicted)
    return _STREAMS[key]


@dataclass(frozen=True)
class TarMember(ImageRef):
    """An image member of a tar shard: ``size`` bytes at byte ``offset`` of the (decompressed) archive.

    Plain shards are read by seeking to ``offset``; gzip-compressed ones (``compressed``) from the process's open
    stream of the shard, which moves forward to ``offset`` (members read in order cost one decompression of the
    shard; reading backwards restarts the stream).
    """

    shard: Path
    name: str
    offset: int
    size: int
    compressed: bool = False

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"

    def stat_key(self) -> tuple[int, int]:
        """The member's size and its shard's modification time."""
        try:
            return self.size, self.shard.stat().st_mtime_ns
        except OSError:
            return -1, -1

    def read_bytes(self) -> bytes:
        if self.compressed:
            stream = _gzip_stream(self.shard)
            stream.seek(self.offset)
            return stream.read(self.size)
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def shards_in(folder: Path) -> list[Path]:
    """The shards (``.tar``, ``.tar.gz``, ``.tgz``) directly in ``folder``, in natural order."""
    return sorted({p for pattern in SHARD_GLOBS for p in folder.glob(pattern)}, key=_natural)


def shard_list(path: str | Path, split: str | None = None) -> tuple[list[Path], Path]:
    """The shards at ``path`` in order, and the folder that holds ``classnames.txt`` (the dataset root)."""
    from webdataset.shardlists import expand_urls

    text = str(path)
    if not Path(text).exists():  # a pattern, expanded as webdataset does ("::" lists, braces), then globbed
        shards = [Path(p) for pattern in expand_urls(text) for p in sorted(glob.glob(pattern), key=_natural)]
        if not shards:
            raise DataError(f"no shard matches {text!r}")
        root = shards[0].parent
    elif Path(text).is_file():
        shards, root = [Path(text)], Path(text).parent
    else:
        folder = Path(text)
        if split is not None and (folder / split).is_dir():
            shards, root = shards_in(folder / split), folder
        else:
            shards, root = shards_in(folder), folder
            if not shards:
                present = sorted(p.name for p in folder.iterdir() if p.is_dir() and shards_in(p))
                raise DataError(f"{text!r} has no shards for split {split!r} (splits with shards: "
                                f"{', '.join(present) or 'none'})")
    if not (root / "classnames.txt").is_file() and (root.parent / "classnames.txt").is_file():
        root = root.parent  # a shard or a pattern inside root/{split}/
    return shards, root


def read_samples(shards: list[Path]) -> list[dict[str, object]]:
    """Samples in shard order: ``{"__key__", "__image__": TarMember, "txt": str, "cls": str, ...}``."""
    from webdataset.tariterators import base_plus_ext

    samples: list[dict[str, object]] = []
    for shard in shards:
        compressed = is_gzip_shard(shard)
        kind = "a gzip-compressed tar" if compressed else "an uncompressed tar (name gzip shards .tar.gz)"
        try:  # a gzip shard as a stream ("r|gz"): its members in order, without seeking back
            with tarfile.open(shard, mode="r|gz" if compressed else "r:") as archive:
                samples += _shard_samples(archive, shard, compressed, base_plus_ext)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot read shard {str(shard)!r} as {kind} ({exc})") from None
    if not samples:
        raise DataError(f"no samples in {', '.join(map(str, shards[:3]))}")
    return samples


def _shard_samples(archive: tarfile.TarFile, shard: Path, compressed: bool, base_plus_ext) -> list[dict[str, object]]:
    samples: list[dict[str, object]] = []
    current: dict[str, object] = {}
    for member in archive:
        if not member.isfile():
            continue
        key, ext = base_plus_ext(member.name)
        if key is None:
            continue
        if current.get("__key__") != key:
            if current:
                samples.append(current)
            current = {"__key__": key, "__shard__": shard}
        ext = ext.lower()
        if ext in IMAGE_EXTENSIONS and "__image__" not in current:
            current["__image__"] = TarMember(shard, member.name, member.offset_data, member.size, compressed)
        elif ext in ("txt", "cls"):
            current[ext] = archive.extractfile(member).read().decode("utf-8")
    if current:
        samples.append(current)
    return samples


def _need(sample: dict, ext: str) -> str:
    if "__image__" not in sample:
        raise DataError(f"{sample['__shard__']}: sample {sample['__key__']!r} has no image "
                        f"({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
    if ext not in sample:
        raise DataError(f"{sample['__shard__']}: sample {sample['__key__']!r} has no .{ext} member")
    return sample[ext]  # type: ignore[return-value]


def read_wds_retrieval(path: str | Path, split: str | None = None) -> tuple[list[TarMember], list[list[str]], str]:
    """Images and their captions (the ``.txt`` member's lines, as clip_benchmark splits them)."""
    shards, root = shard_list(path, split)
    samples = read_samples(shards)
    captions = [[line.strip() for line in _need(s, "txt").splitlines() if line.strip()] for s in samples]
    return [s["__image__"] for s in samples], captions, root.name  # type: ignore[misc]


def read_wds_classification(path: str | Path, split: str | None = None
                            ) -> tuple[list[TarMember], list[int], list[str] | None, list[str] | None, str]:
    """Images, ``.cls`` labels, and the root's class names and templates (``None`` where the file is absent)."""
    shards, root = shard_list(path, split)
    samples = read_samples(shards)
    labels = []
    for sample in samples:
        value = _need(sample, "cls").strip()
        if not value.lstrip("-").isdigit():
            raise DataError(f"{sample['__shard__']}: sample {sample['__key__']!r}: .cls is not a class id "
                            f"({value!r:.40})")
        labels.append(int(value))
    names = root / "classnames.txt"
    templates = root / "zeroshot_classification_templates.txt"
    classnames = [line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if names.is_file() else None
    prompts = [line.strip() for line in templates.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if templates.is_file() else None
    return [s["__image__"] for s in samples], labels, classnames, prompts, root.name  # type: ignore[misc]
