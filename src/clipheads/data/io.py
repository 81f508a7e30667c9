"""Reading dataset files with one-line errors: JSON, CSV/TSV tables, and paths relative to a dataset file."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from clipheads.errors import DataError


def _require_file(path: Path) -> None:
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".json", ".csv", ".tsv", ".tab"))
        hint = f"; dataset files there: {', '.join(files[:6])}{', ...' if len(files) > 6 else ''}" if files else ""
        raise DataError(f"{str(path)!r} is a folder, not a dataset file{hint}")
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    _require_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(path)!r} is not valid JSON ({exc})") from None


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV (``,``) or TSV (``.tsv``/``.tab``, tab) file with a header row; cells are stripped."""
    path = Path(path)
    _require_file(path)
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = []
            for row in reader:
                if None in row:  # DictReader puts the cells past the header's under the key None, as a list
                    raise DataError(f"{str(path)!r} line {reader.line_num} has more cells than its header has "
                                    f"columns ({len(reader.fieldnames or ())}): is it a "
                                    f"{'TSV' if delimiter == chr(9) else 'CSV'} file with a header row? (quote cells "
                                    "that hold the delimiter)")
                rows.append({(k or "").strip().lower(): (v or "").strip() for k, v in row.items()})
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse {str(path)!r} as {'TSV' if delimiter == chr(9) else 'CSV'} ({exc})") from None
    return rows


def column(rows: list[dict[str, str]], names: tuple[str, ...], source: str | Path) -> str:
    """The first of ``names`` that is a column of ``rows`` (header names are lower-cased)."""
    present = rows[0].keys() if rows else ()
    for name in names:
        if name in present:
            return name
    raise DataError(f"{str(source)!r} has no {'/'.join(names)} column (columns: {', '.join(present) or 'none'})")


def resolve(root: Path, *parts: str) -> Path:
    """A path from a dataset file: absolute paths stay, relative ones are read from ``root``."""
    path = Path(*[p for p in parts if p])
    return path if path.is_absolute() else root / path


def require(items: list, what: str, source: str | Path) -> list:
    if not items:
        raise DataError(f"{str(source)!r} has no {what}")
    return items
