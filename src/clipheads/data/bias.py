"""Counterfactual bias sets (SocialCounterfactuals style): groups of images identical but for one attribute (or one
intersection of attributes, ``race-gender``), as clipheads JSON or a Hugging Face dataset in SocialCounterfactuals'
columns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipheads.data.io import read_json, require, resolve
from clipheads.data.schema import CounterfactualImage, check
from clipheads.errors import DataError


@dataclass
class CounterfactualDataset:
    """Neutral text ``queries`` and images, each with its ``group``, the ``attribute`` it varies and its ``value``."""

    queries: list[str]
    image_paths: list[Path]
    groups: list[str]
    attributes: list[str]
    values: list[str]
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        source = self.source or "counterfactual dataset"
        require(self.queries, "neutral 'queries'", source)
        require(self.image_paths, "images", source)
        attribute_of: dict[str, str] = {}
        for group, attribute in zip(self.groups, self.attributes, strict=True):
            if attribute_of.setdefault(group, attribute) != attribute:
                raise DataError(f"{source}: group {group!r} varies both {attribute_of[group]!r} and {attribute!r}; "
                                "the images of a group differ in one attribute only")
        for attribute in sorted(set(self.attributes)):
            values = {v for a, v in zip(self.attributes, self.values, strict=True) if a == attribute}
            if len(values) < 2:
                raise DataError(f"{source}: attribute {attribute!r} has one value only ({values.pop()!r}); MaxSkew "
                                "needs two or more")

    def __len__(self) -> int:
        return len(self.image_paths)

    def to_dict(self) -> dict:
        return {"name": self.name, "format": "counterfactual", "source": self.source, "n_images": len(self),
                "n_groups": len(set(self.groups)), "n_queries": len(self.queries),
                "attributes": sorted(set(self.attributes))}


def load_queries(queries: str | Path | list[str]) -> list[str]:
    """Neutral queries: a list, or a UTF-8 text file with one per line (blank lines and ``#`` comments skipped)."""
    if isinstance(queries, list):
        if not all(isinstance(q, str) and q.strip() for q in queries):
            raise DataError("queries: expected non-empty strings")
        return list(queries)
    path = Path(queries)
    if not path.is_file():
        raise DataError(f"query file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"query file {str(path)!r} is not UTF-8 text ({exc})") from None
    return require([line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")],
                   "queries", path)


def load_counterfactual(path: str | Path, split: str | None = None, image_column: str | None = None,
                        group_column: str | None = None, attribute_columns: list[str] | str | None = None,
                        text_column: str | None = None, queries: str | Path | list[str] | None = None
                        ) -> CounterfactualDataset:
    """A counterfactual bias set: clipheads' JSON, or a Hugging Face dataset (file, folder or Hub id) in
    SocialCounterfactuals' columns (:func:`clipheads.data.hf.read_hf_counterfactual`).

    JSON: ``{"queries": [...], "images": [{"image", "group", "attribute", "value"}, ...]}``, image paths relative
    to the file's folder.

    Args:
        split: the split of a Hugging Face dataset with several.
        image_column, group_column, text_column: Hugging Face columns (default ``image``, ``counterfactual_set``,
            ``caption``).
        attribute_columns: the attribute value columns, a list or ``"a1,a2"`` (default: each ``X`` with an
            ``X_type`` column, as SocialCounterfactuals' ``a1``/``a2``).
        queries: neutral queries (a file, one per line, or a list) replacing the data's own (the JSON's
            ``queries``; for a Hugging Face dataset its captions less their attribute values).
    """
    from clipheads.data.sources import detect_source

    given = load_queries(queries) if queries is not None else None
    if detect_source(path, split) in ("hf", "hub"):
        from clipheads.data.hf import read_hf_counterfactual

        if isinstance(attribute_columns, str):
            attribute_columns = [c.strip() for c in attribute_columns.split(",") if c.strip()]
        refs, groups, attributes, values, derived, name = read_hf_counterfactual(
            Path(path), split, image_column, group_column, attribute_columns, text_column)
        if given is None and not derived:
            raise DataError(f"{str(path)!r} has no caption column to derive neutral queries from; give them with "
                            "--queries FILE (one per line)")
        return CounterfactualDataset(given or derived, refs, groups, attributes, values, name, str(path))
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{str(path)!r}: expected {{'queries': [...], 'images': [{{'image', 'group', 'attribute', "
                        "'value'}, ...]}")
    rows = []
    for n, item in enumerate(data["images"]):
        entry = check(CounterfactualImage, item, f"image entry {n}", path)
        rows.append((resolve(path.parent, entry.image), str(entry.group), entry.attribute, str(entry.value)))
    own = data.get("queries", [])
    if not isinstance(own, list) or not all(isinstance(q, str) for q in own):
        raise DataError(f"{str(path)!r}: field 'queries': expected a list of strings")
    paths, groups, attributes, values = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])
    return CounterfactualDataset(given if given is not None else list(own), paths, groups, attributes, values,
                                 path.stem, str(path))
