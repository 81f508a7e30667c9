"""Matching images to captions: caption selection (one image, several candidates) and Cola-style compositional
pairs (two images, two captions, each caption fits exactly one image)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipheads.data.io import column, read_json, read_table, require, resolve
from clipheads.data.schema import CompositionalItem, SelectionItem, SugarCrepeItem, check
from clipheads.errors import DataError


@dataclass
class CaptionSelectionDataset:
    """``candidates[i]`` are the captions offered for ``image_paths[i]``; ``answers[i]`` indexes the right one."""

    image_paths: list[Path]
    candidates: list[list[str]]
    answers: list[int]
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        require(self.image_paths, "items", self.source or "caption selection dataset")
        for path, candidates, answer in zip(self.image_paths, self.candidates, self.answers, strict=True):
            if len(candidates) < 2:
                raise DataError(f"{self.source}: image {str(path)!r} has {len(candidates)} candidate caption(s); "
                                "caption selection needs at least 2")
            if not 0 <= answer < len(candidates):
                raise DataError(f"{self.source}: image {str(path)!r} has answer {answer} but {len(candidates)} "
                                "candidates (answers are 0-based)")

    def __len__(self) -> int:
        return len(self.image_paths)

    def to_dict(self) -> dict:
        return {"name": self.name, "format": "selection", "source": self.source, "n_images": len(self),
                "n_candidates": sum(len(c) for c in self.candidates)}


def _selection_item(item: object, n: int, root: Path, source: Path) -> tuple[Path, list[str], int]:
    entry = check(SelectionItem, item, f"item {n}", source)
    return resolve(root, entry.image), list(entry.candidates), entry.answer


def _table_answer(value: str) -> int | str:
    """A CSV answer cell as an integer when it is one (``"1"``); anything else is left for the schema to refuse."""
    return int(value) if value.isdigit() else value


def _is_sugar_crepe(data: object) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "negative_caption" in v for v in data.values())


def load_caption_selection(path: str | Path, root: str | Path | None = None) -> CaptionSelectionDataset:
    """JSON ``[{"image", "candidates": [...], "answer": i}, ...]`` (or one such object), a SugarCrepe file
    (``{"0": {"filename", "caption", "negative_caption"}, ...}``: candidates [caption, negative], answer 0, images in
    ``root``, COCO's ``val2017/``), or a CSV/TSV with ``image``, ``answer`` and candidate columns (every column whose
    name starts with ``caption`` or ``candidate``, in order). Image paths are relative to ``root`` (default: the
    file's folder)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    if path.suffix.lower() == ".json":
        data = read_json(path)
        if _is_sugar_crepe(data):
            items = [check(SugarCrepeItem, item, f"item {key!r}", path) for key, item in data.items()]
            return CaptionSelectionDataset([resolve(base, item.filename) for item in items],
                                           [[item.caption, item.negative_caption] for item in items],
                                           [0] * len(items), path.stem, str(path))
        items = [data] if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise DataError(f"{str(path)!r}: expected a list of caption selection items")
        parsed = [_selection_item(item, n, base, path) for n, item in enumerate(items)]
    else:
        rows = require(read_table(path), "rows", path)
        image_col = column(rows, ("image", "filepath", "filename", "path"), path)
        answer_col = column(rows, ("answer", "label", "target"), path)
        candidate_cols = [c for c in rows[0] if c.startswith(("caption", "candidate"))]
        parsed = [_selection_item({"image": row[image_col], "answer": _table_answer(row[answer_col]),
                                   "candidates": [row[c] for c in candidate_cols if row[c]]}, n, base, path)
                  for n, row in enumerate(rows)]
    paths, candidates, answers = (list(values) for values in zip(*parsed, strict=True)) if parsed else ([], [], [])
    return CaptionSelectionDataset(paths, candidates, answers, path.stem, str(path))


@dataclass
class CompositionalDataset:
    """Pairs: ``image_pairs[i] = (a, b)`` and ``caption_pairs[i] = (fits a, fits b)``."""

    image_pairs: list[tuple[Path, Path]]  # or ImageRef pairs (Winoground as a Hugging Face dataset)
    caption_pairs: list[tuple[str, str]]
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        require(self.image_pairs, "pairs", self.source or "compositional dataset")

    def __len__(self) -> int:
        return len(self.image_pairs)

    def to_dict(self) -> dict:
        return {"name": self.name, "format": "compositional", "source": self.source, "n_pairs": len(self)}


def read_winoground(path: Path, split: str | None = None) -> CompositionalDataset:
    """Winoground as published on the Hugging Face hub (``facebook/winoground``, saved with ``save_to_disk`` or as
    parquet): columns ``image_0``, ``image_1``, ``caption_0``, ``caption_1`` (caption i fits image i)."""
    from clipheads.data.hf import image_refs, open_hf, pick_column

    dataset = open_hf(path, split)
    columns = {name: pick_column(dataset, None, (name,), name, path)
               for name in ("image_0", "image_1", "caption_0", "caption_1")}
    first, second = (image_refs(dataset, columns[f"image_{i}"], path) for i in (0, 1))
    captions = list(zip(dataset[columns["caption_0"]], dataset[columns["caption_1"]], strict=True))
    return CompositionalDataset(list(zip(first, second, strict=True)), captions,
                                path.name if path.is_dir() else path.stem, str(path))


def load_compositional(path: str | Path, split: str | None = None) -> CompositionalDataset:
    """JSON ``[{"images": ["a.png", "b.png"], "captions": ["fits a", "fits b"]}, ...]``, or Winoground as a Hugging
    Face dataset (:func:`read_winoground`)."""
    from clipheads.data.sources import detect_source

    if detect_source(path, split) in ("hf", "hub"):
        return read_winoground(Path(path), split)
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{str(path)!r}: expected a list of {{'images': [a, b], 'captions': [fits a, fits b]}}")
    images, captions = [], []
    for n, item in enumerate(data):
        pair = check(CompositionalItem, item, f"item {n} (2 'images' and 2 'captions', caption i fits image i)",
                     path)
        images.append((resolve(path.parent, pair.images[0]), resolve(path.parent, pair.images[1])))
        captions.append((pair.captions[0], pair.captions[1]))
    return CompositionalDataset(images, captions, path.stem, str(path))
