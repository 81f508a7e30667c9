"""Counterfactual bias sets (SocialCounterfactuals style): groups of images identical but for one attribute."""

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


def load_counterfactual(path: str | Path) -> CounterfactualDataset:
    """JSON ``{"queries": [...], "images": [{"image", "group", "attribute", "value"}, ...]}``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{str(path)!r}: expected {{'queries': [...], 'images': [{{'image', 'group', 'attribute', "
                        "'value'}, ...]}")
    rows = []
    for n, item in enumerate(data["images"]):
        entry = check(CounterfactualImage, item, f"image entry {n}", path)
        rows.append((resolve(path.parent, entry.image), str(entry.group), entry.attribute, str(entry.value)))
    queries = data.get("queries", [])
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise DataError(f"{str(path)!r}: field 'queries': expected a list of strings")
    paths, groups, attributes, values = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])
    return CounterfactualDataset(list(queries), paths, groups, attributes, values,
                                 path.stem, str(path))
