"""Reading dataset files with one-line errors: JSON, CSV/TSV tables, and paths relative to a dataset file."""

from __future__ import annotations

import csv
import io
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


def _delimiter(path: Path, sample: str) -> str:
    """Tab for ``.tsv``/``.tab``; otherwise what :class:`csv.Sniffer` finds in the header line among ``,``, tab,
    ``;`` and ``|`` (open_clip's training CSVs are tab-separated under a ``.csv`` name), else ``,``."""
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    header = sample.splitlines()[0] if sample else ""
    try:
        return csv.Sniffer().sniff(header, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file with a header row; cells are stripped, header names lower-cased.

    A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped; the delimiter is sniffed from the header (see
    :func:`_delimiter`); a row with more fields than the header is refused with its line number.
    """
    path = Path(path)
    _require_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text ({exc}); save it as UTF-8") from None
    delimiter = _delimiter(path, text)
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip().lower() for name in next(reader, [])]
        rows = []
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) > len(header):
                raise DataError(f"{str(path)!r} line {reader.line_num}: {len(cells)} fields but the header has "
                                f"{len(header)} ({', '.join(header)}); quote cells that contain {delimiter!r}")
            cells = cells + [""] * (len(header) - len(cells))
            rows.append({name: cell.strip() for name, cell in zip(header, cells, strict=True)})
    except csv.Error as exc:
        raise DataError(f"cannot parse {str(path)!r} as {kind} (line {reader.line_num}: {exc})") from None
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
