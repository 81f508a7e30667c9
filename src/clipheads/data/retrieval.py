"""Image-text retrieval datasets: Karpathy split files, COCO captions annotations, CSV/TSV of image + caption.

Captions can be in any language (COCO-CN, Flickr30k-CNA work the same way with a Chinese-CLIP model).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipheads.data.io import column, read_json, read_table, require, resolve
from clipheads.data.schema import CocoCaption, CocoImage, KarpathyImage, check
from clipheads.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class RetrievalDataset:
    """Images with one or more captions each; ``captions[i]`` are the captions of ``image_paths[i]``."""

    image_paths: list[Path]  # or ImageRef (tar member, Hugging Face dataset cell)
    captions: list[list[str]]
    name: str = ""
    split: str | None = None
    source: str = ""
    format: str = ""

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.captions):
            raise DataError(f"{self.source or 'retrieval dataset'}: {len(self.image_paths)} images but captions for "
                            f"{len(self.captions)}")
        self.image_paths, self.captions = merge_duplicate_images(self.image_paths, self.captions, self.source)
        for path, caps in zip(self.image_paths, self.captions, strict=True):
            if not caps or not all(c.strip() for c in caps):
                raise DataError(f"{self.source or 'retrieval dataset'}: image {str(path)!r} has no caption or an "
                                "empty one; every image needs at least one caption")
        where = f" split {self.split!r}" if self.split else ""
        require(self.image_paths, f"images{where}", self.source or "retrieval dataset")

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def texts(self) -> list[str]:
        """All captions, image by image: ``[N_txt]``."""
        return [c for caps in self.captions for c in caps]

    @property
    def text_to_image(self) -> list[int]:
        """For each caption of :attr:`texts`, the index of its image: ``[N_txt]``."""
        return [i for i, caps in enumerate(self.captions) for _ in caps]

    def to_dict(self) -> dict:
        return {"name": self.name, "format": self.format, "source": self.source, "split": self.split,
                "n_images": len(self), "n_texts": len(self.texts)}


def merge_duplicate_images(image_paths: list, captions: list[list[str]], source: str = "") -> tuple[list, list]:
    """One entry per image: an image listed twice keeps its first position and all its captions (in order).

    Every retrieval reader goes through this (CSV rows of one image, a Karpathy or COCO file that lists an image
    twice), so that an image never competes with itself for its own captions.
    """
    merged: dict = {}
    for path, caps in zip(image_paths, captions, strict=True):
        merged.setdefault(path, []).extend(caps)
    if len(merged) < len(image_paths):
        logger.warning("%s: %d images listed more than once; their captions were merged", source or "retrieval data",
                       len(image_paths) - len(merged))
    return list(merged), list(merged.values())


def read_karpathy(path: Path, split: str | None = None, root: Path | None = None) -> RetrievalDataset:
    """Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``): ``split=None`` keeps every image."""
    data = read_json(path)
    root = root or path.parent
    entries = require(data.get("images", []) if isinstance(data, dict) else [], "'images' entries", path)
    if not isinstance(entries, list):
        raise DataError(f"{str(path)!r}: field 'images': expected a list of image entries")
    # every entry is checked, numbered as in the file: a "split": 5 is an error, not an image left out of each split
    entries = [check(KarpathyImage, raw, f"image entry {n}", path) for n, raw in enumerate(entries)]
    if split is not None:
        kept = [e for e in entries if e.split == split]
        if not kept:
            present = sorted({str(e.split) for e in entries})
            raise DataError(f"{str(path)!r} has no images in split {split!r} (splits present: {', '.join(present)})")
        entries = kept
    paths, captions = [], []
    for entry in entries:
        paths.append(resolve(root, entry.filepath, entry.filename))
        captions.append([s.raw if s.raw is not None else " ".join(s.tokens or []) for s in entry.sentences])
    return RetrievalDataset(paths, captions, data.get("dataset", path.stem), split, str(path), "karpathy")


def _coco_image_root(path: Path) -> Path:
    """COCO keeps ``annotations/captions_val2014.json`` next to ``val2014/``: use that folder when it exists."""
    match = re.fullmatch(r"captions_(\w+)\.json", path.name)
    if match and path.parent.name == "annotations" and (path.parent.parent / match.group(1)).is_dir():
        return path.parent.parent / match.group(1)
    return path.parent


def read_coco_captions(path: Path, split: str | None = None, root: Path | None = None) -> RetrievalDataset:
    """COCO captions annotation JSON (``captions_val2014.json``): one file is one split, ``split`` is not used."""
    data = read_json(path)
    if split is not None:
        logger.info("%s: a COCO captions file holds one split; ignoring split=%r", path, split)
    root = root or _coco_image_root(path)
    if not isinstance(data, dict):
        raise DataError(f"{str(path)!r} is not a COCO captions JSON (a {type(data).__name__}, not an object)")
    for key, what in (("images", "images"), ("annotations", "captions")):
        if not isinstance(data.get(key), list):
            found = "missing" if key not in data else f"a {type(data[key]).__name__}"
            raise DataError(f"{str(path)!r}: COCO '{key}' must be a list of {what}; it is {found}")
    images = [check(CocoImage, image, f"image {n}", path)
              for n, image in enumerate(require(data["images"], "'images' entries", path))]
    index: dict[int | str, int] = {}
    for n, image in enumerate(images):
        if image.id in index:
            first = index[image.id]
            raise DataError(f"{str(path)!r}: image id {image.id!r} is given twice in 'images' (entries {first} "
                            f"and {n}: {images[first].file_name!r} and {image.file_name!r}); ids must be unique")
        index[image.id] = n
    captions: list[list[str]] = [[] for _ in images]
    for n, raw in enumerate(data["annotations"]):
        annotation = check(CocoCaption, raw, f"annotation {n}", path)
        if annotation.image_id not in index:
            raise DataError(f"{str(path)!r}: caption {annotation.id} belongs to image_id "
                            f"{annotation.image_id}, which is not in 'images'")
        captions[index[annotation.image_id]].append(annotation.caption)
    paths = [resolve(root, image.file_name) for image in images]
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    return RetrievalDataset(paths, captions, str(info.get("description") or path.stem), None, str(path),
                            "coco")


def read_retrieval_table(path: Path, split: str | None = None, root: Path | None = None) -> RetrievalDataset:
    """CSV/TSV with a header: ``image`` (or filepath/filename/path) and ``caption`` (or text/title) columns, an
    optional ``split`` column. Rows of the same image are its captions."""
    rows = require(read_table(path), "rows", path)
    root = root or path.parent
    image_col = column(rows, ("image", "filepath", "filename", "path"), path)
    caption_col = column(rows, ("caption", "text", "title", "sentence"), path)
    if split is not None:
        if "split" in rows[0]:
            rows = [r for r in rows if r["split"] == split]
            require(rows, f"rows in split {split!r}", path)
        else:
            logger.info("%s has no split column; using every row", path)
    by_image: dict[str, list[str]] = {}
    for n, row in enumerate(rows, start=2):
        if not row[image_col] or not row[caption_col]:
            raise DataError(f"{str(path)!r} line {n}: empty {image_col if not row[image_col] else caption_col}")
        by_image.setdefault(row[image_col], []).append(row[caption_col])
    paths = [resolve(root, name) for name in by_image]
    has_split = split if split is not None and "split" in rows[0] else None
    return RetrievalDataset(paths, list(by_image.values()), path.stem, has_split, str(path), "csv")


FLICKR_LINE = re.compile(r"(.+?\.(?:jpe?g|png|webp))\s*,\s*(.*)", re.IGNORECASE)


#: where Flickr30k's Kaggle archives put the images under the dataset root (adityajn105/flickr30k: ``Images/``;
#: hsankesara/flickr-image-dataset: ``flickr30k_images/``); clip_benchmark expects them in the root itself
FLICKR_IMAGE_FOLDERS = ("Images", "flickr30k_images", "flickr30k-images", "images")


def read_flickr_txt(path: Path, split: str | None = None, root: Path | None = None) -> RetrievalDataset:
    """clip_benchmark's Flickr annotation text (``flickr30k_{split}_karpathy.txt``): a header line, then
    ``file.jpg,caption`` per line, split after the image name (captions contain commas); images in its folder, or
    in its ``Images/`` or ``flickr30k_images/`` subfolder (:data:`FLICKR_IMAGE_FOLDERS`) when they are not there.

    A folder is read as clip_benchmark's dataset root: its ``flickr30k_{split}_karpathy.txt`` (``split`` default
    ``test``).
    """
    from clipheads.data.sources import flickr_txt_in

    if path.is_dir():
        found = flickr_txt_in(path, split)
        if found is None:
            raise DataError(f"{str(path)!r} has no flickr*_{split or 'test'}_karpathy.txt")
        path = found
    root = root or path.parent
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text ({exc})") from None
    by_image: dict[Path, list[str]] = {}  # one line per caption: lines of the same image are its captions
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        match = FLICKR_LINE.fullmatch(line.strip())
        if match is None or not match.group(2).strip():
            raise DataError(f"{str(path)!r} line {n}: expected image.jpg,caption (got {line.strip()!r:.80})")
        by_image.setdefault(resolve(root, match.group(1)), []).append(match.group(2).strip())
    paths, captions = require(list(by_image), "image,caption lines", path), list(by_image.values())
    if not paths[0].exists() and paths[0].is_relative_to(root):  # Kaggle's archives keep the images one folder down
        first = paths[0].relative_to(root)
        below = next((root / name for name in FLICKR_IMAGE_FOLDERS if (root / name / first).is_file()), None)
        if below is not None:
            paths = [below / p.relative_to(root) for p in paths]
    split_name = re.search(r"_(train|val|test|restval)_", path.name)
    return RetrievalDataset(paths, captions, path.name.split("_")[0], split_name.group(1) if split_name else None,
                            str(path), "clip_benchmark_txt")


def read_hf_retrieval_dataset(path: Path, split: str | None = None, root: Path | None = None,
                              image_column: str | None = None, text_column: str | None = None) -> RetrievalDataset:
    """A Hugging Face dataset (``save_to_disk`` folder, parquet/arrow) of images with a caption or captions each."""
    from clipheads.data.hf import read_hf_retrieval

    refs, captions, name = read_hf_retrieval(path, split, image_column, text_column)
    return RetrievalDataset(refs, captions, name, split, str(path), "hf")


def read_wds_retrieval_dataset(path: Path, split: str | None = None, root: Path | None = None) -> RetrievalDataset:
    """webdataset shards (clip_benchmark layout) of an image and ``.txt`` captions per sample."""
    from clipheads.data.wds import read_wds_retrieval

    refs, captions, name = read_wds_retrieval(path, split)
    return RetrievalDataset(refs, captions, name, split, str(path), "wds")


RETRIEVAL_READERS: dict[str, Callable[..., RetrievalDataset]] = {
    "karpathy": read_karpathy,
    "coco": read_coco_captions,
    "csv": read_retrieval_table,
    "clip_benchmark_txt": read_flickr_txt,
    "hf": read_hf_retrieval_dataset,
    "wds": read_wds_retrieval_dataset,
}


def detect_retrieval_format(path: Path) -> str:
    if path.suffix.lower() in (".csv", ".tsv", ".tab"):
        return "csv"
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:  # a malformed COCO file is reported as one
        return "coco"
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return "karpathy"
    raise DataError(f"{str(path)!r} is neither a Karpathy split JSON ('images' with 'sentences'), a COCO captions "
                    "JSON ('images' + 'annotations') nor a CSV/TSV of image,caption")


def load_retrieval(path: str | Path, split: str | None = None, root: str | Path | None = None,
                   format: str | None = None, image_column: str | None = None,
                   text_column: str | None = None) -> RetrievalDataset:
    """Read a retrieval dataset; the format (a key of :data:`RETRIEVAL_READERS`) is found from the path unless given.

    Args:
        path: a dataset file (Karpathy/COCO JSON, CSV/TSV, clip_benchmark Flickr txt), a Hugging Face dataset
            (``save_to_disk`` folder, parquet/arrow, or a Hub id ``org/name`` read from the local cache when
            offline), webdataset shards (file, folder or pattern). Image paths in
            files are relative to their folder unless ``root`` is given.
        split: ``train``/``val``/``test``/``restval``/... for data that carry splits; ``None`` keeps all images.
        root: folder the image paths are relative to.
        image_column, text_column: Hugging Face dataset columns (default: ``image``; ``caption``/``captions``/...).
    """
    from clipheads.data.sources import detect_source

    path = Path(path) if not isinstance(path, Path) else path
    if format is None:
        source = detect_source(path, split)
        if source == "imagenet_val":
            raise DataError(f"{str(path)!r} is a folder of images, not retrieval data (give a Karpathy/COCO JSON, "
                            "a CSV, a Hugging Face dataset, webdataset shards or a clip_benchmark Flickr txt)")
        format = {"hf": "hf", "hub": "hf", "wds": "wds", "flickr_txt": "clip_benchmark_txt"}.get(source) \
            or detect_retrieval_format(path)
    if format not in RETRIEVAL_READERS:
        raise DataError(f"unknown retrieval format {format!r}; choose one of {', '.join(RETRIEVAL_READERS)}")
    if format == "hf":
        return read_hf_retrieval_dataset(path, split, None, image_column, text_column)
    return RETRIEVAL_READERS[format](path, split, Path(root) if root is not None else None)
