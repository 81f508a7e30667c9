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
from clipheads.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class RetrievalDataset:
    """Images with one or more captions each; ``captions[i]`` are the captions of ``image_paths[i]``."""

    image_paths: list[Path]
    captions: list[list[str]]
    name: str = ""
    split: str | None = None
    source: str = ""
    format: str = ""

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.captions):
            raise DataError(f"{self.source or 'retrieval dataset'}: {len(self.image_paths)} images but captions for "
                            f"{len(self.captions)}")
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


def read_karpathy(path: Path, split: str | None = None, root: Path | None = None) -> RetrievalDataset:
    """Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``): ``split=None`` keeps every image."""
    data = read_json(path)
    root = root or path.parent
    entries = require(data.get("images", []) if isinstance(data, dict) else [], "'images' entries", path)
    if split is not None:
        kept = [e for e in entries if e.get("split") == split]
        if not kept:
            present = sorted({str(e.get("split")) for e in entries})
            raise DataError(f"{str(path)!r} has no images in split {split!r} (splits present: {', '.join(present)})")
        entries = kept
    paths, captions = [], []
    for n, entry in enumerate(entries):
        if "filename" not in entry:
            raise DataError(f"{str(path)!r}: image entry {n} has no 'filename'")
        paths.append(resolve(root, entry.get("filepath", ""), entry["filename"]))
        captions.append([s["raw"] if "raw" in s else " ".join(s.get("tokens", [])) for s in entry.get("sentences", [])])
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
    images = require(data["images"], "'images' entries", path)
    index: dict[int | str, int] = {}
    for n, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int | str) or "file_name" not in image:
            raise DataError(f"{str(path)!r}: COCO image entry {n} needs an 'id' (number or string) and a "
                            "'file_name'")
        if image["id"] in index:
            first = index[image["id"]]
            raise DataError(f"{str(path)!r}: image id {image['id']!r} is given twice in 'images' (entries {first} "
                            f"and {n}: {images[first]['file_name']!r} and {image['file_name']!r}); ids must be unique")
        index[image["id"]] = n
    captions: list[list[str]] = [[] for _ in images]
    for n, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
            raise DataError(f"{str(path)!r}: COCO annotation {n} is not an object with a 'caption' text")
        image_id = annotation.get("image_id")
        if not isinstance(image_id, int | str) or image_id not in index:
            raise DataError(f"{str(path)!r}: caption {annotation.get('id')} belongs to image_id {image_id!r}, which "
                            "is not in 'images'")
        captions[index[image_id]].append(annotation["caption"])
    paths = [resolve(root, image["file_name"]) for image in images]
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


RETRIEVAL_READERS: dict[str, Callable[..., RetrievalDataset]] = {
    "karpathy": read_karpathy,
    "coco": read_coco_captions,
    "csv": read_retrieval_table,
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
                   format: str | None = None) -> RetrievalDataset:
    """Read a retrieval dataset; the format (``karpathy``, ``coco``, ``csv``) is detected unless given.

    Args:
        path: the dataset file. Image paths in it are relative to its folder unless ``root`` is given.
        split: ``train``/``val``/``test``/``restval``/... for files that carry splits; ``None`` keeps all images.
        root: folder the image paths are relative to.
    """
    path = Path(path)
    format = format or detect_retrieval_format(path)
    if format not in RETRIEVAL_READERS:
        raise DataError(f"unknown retrieval format {format!r}; choose one of {', '.join(RETRIEVAL_READERS)}")
    return RETRIEVAL_READERS[format](path, split, Path(root) if root is not None else None)
