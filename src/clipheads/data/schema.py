"""Schemas of the JSON dataset formats, checked with pydantic: a bad item is one line naming the item and the field.

Strict types: a caption that is a number, a ``"filename": 5`` or an answer ``0.7`` is refused, never coerced
(``"candidates": "ab"`` is not two candidates, ``0.7`` is not answer 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from clipheads.errors import DataError

Item = TypeVar("Item", bound=BaseModel)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class KarpathySentence(_Schema):
    raw: StrictStr | None = None
    tokens: list[StrictStr] | None = None


class KarpathyImage(_Schema):
    """One entry of ``images`` in ``dataset_coco.json`` / ``dataset_flickr30k.json``."""

    filename: StrictStr
    filepath: StrictStr = ""
    split: StrictStr | None = None
    sentences: list[KarpathySentence]


class CocoImage(_Schema):
    id: StrictInt | StrictStr
    file_name: StrictStr


class CocoCaption(_Schema):
    id: StrictInt | StrictStr | None = None
    image_id: StrictInt | StrictStr
    caption: StrictStr


class SelectionItem(_Schema):
    """``{"image": "a.png", "candidates": ["...", "..."], "answer": 0}``."""

    image: StrictStr
    candidates: list[StrictStr] = Field(min_length=2)
    answer: StrictInt = Field(ge=0)


class SugarCrepeItem(_Schema):
    """One entry of a SugarCrepe file (``add_att.json`` ...): ``{"filename", "caption", "negative_caption"}``."""

    filename: StrictStr
    caption: StrictStr
    negative_caption: StrictStr


class CompositionalItem(_Schema):
    """``{"images": [a, b], "captions": [fits a, fits b]}``."""

    images: list[StrictStr] = Field(min_length=2, max_length=2)
    captions: list[StrictStr] = Field(min_length=2, max_length=2)


class CounterfactualImage(_Schema):
    image: StrictStr
    group: StrictStr | StrictInt
    attribute: StrictStr
    value: StrictStr | StrictInt


def explain(exc: ValidationError) -> str:
    """The first error of ``exc`` as ``field 'a.b': message (got 5)``."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    got = "" if error["type"] == "missing" else f" (got {error.get('input')!r:.60})"
    return f"field {where!r}: {error['msg'].lower()}{got}" if where else f"{error['msg'].lower()}{got}"


def check(schema: type[Item], value: Any, item: str, source: str | Path) -> Item:
    """``schema.model_validate(value)``, or a one-line :class:`DataError` naming ``source``, ``item`` and the field."""
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        raise DataError(f"{str(source)!r}: {item}: {explain(exc)}") from None
