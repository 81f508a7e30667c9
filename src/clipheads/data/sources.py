"""What a ``--data`` path is: the one place that looks at a path and picks its reader.

=====================  =====================================================================================
source                 the path
=====================  =====================================================================================
``hf``                 a ``datasets`` ``save_to_disk`` folder, a ``.parquet``/``.arrow`` file or a folder of them
``hub``                a Hugging Face Hub dataset id (``nlphuji/flickr30k``) that is not a local path: read by
                       ``datasets.load_dataset`` (from its local cache when offline, :func:`clipheads.data.hf.open_hub`)
``wds``                a ``.tar`` (or ``.tar.gz``/``.tgz``) shard, a folder of shards or of ``{split}/*.tar``
                       (clip_benchmark's ``wds_*`` layout), or a brace/glob pattern (``test/{0..3}.tar``)
``flickr_txt``         clip_benchmark's ``flickr30k_{split}_karpathy.txt`` (or a folder holding it)
``imagenet_val``       a flat folder of ``ILSVRC2012_val_*.JPEG`` with its labels (devkit, LOC_val_solution.csv
                       or torchvision's ``meta.bin``) beside it or up to four folders up
``folder``             any other folder: an ImageFolder tree (``n01440764/`` folders get readable names)
``file``               any other file: the JSON/CSV formats of each task
=====================  =====================================================================================
"""

from __future__ import annotations

import re
from pathlib import Path

from clipheads.errors import DataError

SOURCES = ("hf", "hub", "wds", "flickr_txt", "imagenet_val", "folder", "file")
HF_SUFFIXES = (".parquet", ".arrow")
HF_SAVED = ("dataset_dict.json", "state.json")
PATTERN = re.compile(r"[{*?\[]")
#: ``org/name`` as the Hub spells dataset ids (one slash); a missing local file with a data suffix is not one
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")
NOT_HUB_SUFFIXES = (".json", ".csv", ".tsv", ".tab", ".txt", ".tar", ".gz", ".tgz", ".parquet", ".arrow", ".jpg",
                    ".jpeg", ".png")
SHARD_SUFFIXES = ("*.tar", "*.tar.gz", "*.tgz")


def is_hub_id(text: str) -> bool:
    """``text`` names a Hugging Face Hub dataset (``org/name``) and no local path."""
    return (HUB_ID.fullmatch(text) is not None and not Path(text).exists()
            and not text.lower().endswith(NOT_HUB_SUFFIXES))


def _has(folder: Path, pattern: str) -> bool:
    return next(folder.glob(pattern), None) is not None


def flickr_txt_in(folder: Path, split: str | None) -> Path | None:
    """``folder/flickr30k_{split}_karpathy.txt`` (or flickr8k_...), if there is one."""
    found = sorted(folder.glob(f"flickr*_{split or 'test'}_karpathy.txt"))
    return found[0] if found else None


def detect_source(path: str | Path, split: str | None = None) -> str:
    """The kind of data at ``path`` (one of :data:`SOURCES`), from its name and what the folder holds."""
    text = str(path)
    if PATTERN.search(text) and not Path(text).exists():
        return "wds"
    if is_hub_id(text):
        return "hub"
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in HF_SUFFIXES:
            return "hf"
        if path.suffix.lower() == ".tar" or path.name.lower().endswith((".tar.gz", ".tgz")):
            return "wds"
        if path.suffix.lower() == ".txt" and _first_line(path).lower().replace(" ", "") in ("image,caption",
                                                                                          "image,captions"):
            return "flickr_txt"
        return "file"
    if path.is_dir():
        if any((path / name).is_file() for name in HF_SAVED):
            return "hf"
        if any(_has(path, f"{glob}{suffix}") for glob in ("*", "*/*", "data/*/*") for suffix in HF_SUFFIXES):
            return "hf"
        if any(_has(path, glob) or (split is not None and _has(path / split, glob)) or _has(path, f"*/{glob}")
               for glob in SHARD_SUFFIXES):
            return "wds"
        if flickr_txt_in(path, split) is not None:
            return "flickr_txt"
        if _has(path, "ILSVRC2012_val_*.JPEG") or _has(path, "ILSVRC2012_val_*.jpeg"):
            return "imagenet_val"
        return "folder"
    raise DataError(f"--data {text!r} does not exist (give a dataset file, a folder, a shard pattern or a Hugging Face "
                    "dataset id org/name)")


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8-sig") as handle:
            return handle.readline().strip()
    except (OSError, UnicodeDecodeError):
        return ""
