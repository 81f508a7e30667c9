"""Hugging Face ``datasets``: ``save_to_disk`` folders, parquet/arrow files or folders of them, and Hub dataset ids
(``nlphuji/flickr30k``) read by ``datasets.load_dataset``, from the local cache when offline (:func:`open_hub`).

Images stay in the dataset's memory-mapped Arrow files: each is an :class:`HFImage` reference read (undecoded) by the
DataLoader workers, so no decoded image is held in memory. Default columns follow the common uploads: ``image``;
``caption`` or ``captions`` (a string or a list of strings); ``label`` (class names from its ``ClassLabel``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from clipheads.data.images import ImageRef
from clipheads.data.sources import HF_SAVED, HF_SUFFIXES, is_hub_id
from clipheads.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "picture")
TEXT_COLUMNS = ("caption", "captions", "text", "sentences", "raw", "sentence", "title")
LABEL_COLUMNS = ("label", "labels", "class", "target", "fine_label")


class HFImage(ImageRef):
    """Row ``row`` of column ``column`` of a Hugging Face dataset, read as stored (PNG/JPEG bytes or a file path)."""

    def __init__(self, table: Any, column: str, row: int, name: str, root: Path) -> None:
        self.table, self.column, self.row, self.name, self.root = table, column, row, name, root

    def _key(self) -> tuple:
        return self.name, self.column, self.row

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFImage) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return f"{self.name}[{self.row}].{self.column}"

    __repr__ = __str__

    def stat_key(self) -> tuple[int, int]:
        """The size and modification time of the dataset's first Arrow file, when it is backed by files."""
        files = getattr(self.table, "cache_files", None) or []
        try:
            stat = Path(files[0]["filename"]).stat()
        except (IndexError, KeyError, OSError, TypeError):
            return -1, -1
        return stat.st_size, stat.st_mtime_ns

    def read_bytes(self) -> bytes:
        cell = self.table[self.row][self.column][0].as_py()  # arrow format: the stored cell, not decoded
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cell["bytes"]
            cell = cell.get("path")
        if isinstance(cell, bytes):
            return cell
        if isinstance(cell, str) and cell:
            path = Path(cell) if Path(cell).is_absolute() else self.root / cell
            return path.read_bytes()
        raise ValueError(f"column {self.column!r} row {self.row} holds no image ({type(cell).__name__})")


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def open_hub(repo_id: str):
    """The Hub dataset ``repo_id`` (a ``DatasetDict`` of its splits) as ``datasets.load_dataset(repo_id)`` gives it,
    never forcing a download (``download_mode`` stays ``reuse_dataset_if_exists``).

    Offline (``HF_HUB_OFFLINE=1``, or no network) ``datasets`` reads what an earlier ``load_dataset`` prepared in
    ``HF_DATASETS_CACHE``; failing that, the repository's files downloaded into the Hub cache (``huggingface-cli
    download --repo-type dataset``: ``HF_HUB_CACHE/datasets--org--name/snapshots/<rev>/``) are read with
    ``datasets.load_dataset(snapshot_folder)``. Raises :class:`DataError` (one line: where it looked, how to get it).
    """
    import datasets
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return datasets.load_dataset(repo_id)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError, HfHubHTTPError) as exc:
        online_error = exc
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", local_files_only=True,
                                   cache_dir=constants.HF_HUB_CACHE)
    except (LocalEntryNotFoundError, OSError, ValueError):
        folder = None
    if folder is not None:
        try:
            return datasets.load_dataset(folder)
        except (OSError, ValueError, RuntimeError, datasets.exceptions.DatasetNotFoundError) as exc:
            raise DataError(f"cannot read Hugging Face dataset {repo_id!r} from its cached files {folder} "
                            f"({_reason(exc)})") from None
    prepared = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(repo_id.split("/"))
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    raise DataError(f"Hugging Face dataset {repo_id!r} is neither a local path nor in the local cache (looked in "
                    f"{prepared} and {hub}) and the Hub gave: {_reason(online_error)}; get it where there is network "
                    f"with `huggingface-cli download --repo-type dataset {repo_id}` (or datasets.load_dataset), "
                    "then point HF_HOME at that cache, or pass a save_to_disk folder or parquet files")


def open_hf(path: str | Path, split: str | None = None):
    """The ``datasets.Dataset`` at ``path`` (split ``split`` of a ``DatasetDict``); one-line errors. ``path`` may be
    a Hub dataset id (:func:`open_hub`)."""
    import datasets

    hub = is_hub_id(str(path))
    path = Path(path)
    try:
        if hub:
            loaded = open_hub(str(path))
        elif path.is_dir() and any((path / name).is_file() for name in HF_SAVED):
            loaded = datasets.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in HF_SUFFIXES)
            builder = "arrow" if files and files[0].suffix == ".arrow" else "parquet"
            if path.is_file():
                loaded = datasets.load_dataset(builder, data_files=str(path))
            else:
                loaded = datasets.load_dataset(builder, data_dir=str(path))
    except (OSError, ValueError, RuntimeError, datasets.exceptions.DatasetNotFoundError) as exc:
        # RuntimeError: a repository with a loading script, which datasets no longer runs
        raise DataError(f"cannot read {str(path)!r} with Hugging Face datasets ({_reason(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split in loaded:
            loaded = loaded[split]
        elif len(splits) == 1:
            if split is not None:
                logger.info("%s has one split (%s); using it for split=%r", path, splits[0], split)
            loaded = loaded[splits[0]]
        else:
            raise DataError(f"{str(path)!r} has splits {', '.join(splits)}; choose one with --split")
    return split_column_rows(loaded, split, path)


SPLIT_COLUMN = "split"


def split_column_rows(dataset, split: str | None, source: str | Path):
    """The rows of ``dataset`` whose ``split`` column is ``split``, when it has such a column of strings holding that
    value: uploads of Karpathy splits keep them there (``nlphuji/flickr30k``: one Hub split ``test`` of all 31,014
    images, a column ``split`` of ``train``/``val``/``test``); otherwise ``dataset`` as it is."""
    if split is None or SPLIT_COLUMN not in dataset.column_names or getattr(
            dataset.features[SPLIT_COLUMN], "dtype", None) not in ("string", "large_string"):
        return dataset
    values = dataset[SPLIT_COLUMN]
    rows = [row for row, value in enumerate(values) if value == split]
    if not rows or len(rows) == len(values):
        return dataset
    logger.info("%s: %d of %d rows have %s=%r", source, len(rows), len(values), SPLIT_COLUMN, split)
    return dataset.select(rows)


def pick_column(dataset, given: str | None, defaults: tuple[str, ...], what: str, source: str | Path) -> str:
    """``given`` if it is a column, else the first of ``defaults`` that is one; one-line error naming the columns."""
    names = list(dataset.column_names)
    if given is not None:
        if given not in names:
            raise DataError(f"{str(source)!r} has no column {given!r} (columns: {', '.join(names)})")
        return given
    lower = {name.lower(): name for name in names}
    for name in defaults:
        if name in lower:
            return lower[name]
    raise DataError(f"{str(source)!r} has no {what} column ({'/'.join(defaults)}; columns: {', '.join(names)}); "
                    f"name it with --{what}-column")


def image_refs(dataset, column: str, source: Path) -> list[HFImage]:
    """One :class:`HFImage` per row of ``column`` (which must hold images, bytes or paths)."""
    import datasets

    feature = dataset.features[column]
    stored = getattr(feature, "dtype", None)
    if not isinstance(feature, datasets.Image) and stored not in ("string", "large_string", "binary",
                                                                 "large_binary"):
        raise DataError(f"{str(source)!r}: column {column!r} holds {type(feature).__name__} "
                        f"{stored or ''}, not images; name the image column with --image-column")
    table = dataset.select_columns([column]).with_format("arrow")
    name = f"{source}@{getattr(dataset, '_fingerprint', '')}"
    root = source if source.is_dir() else source.parent
    return [HFImage(table, column, row, name, root) for row in range(len(dataset))]


def read_hf_retrieval(path: Path, split: str | None = None, image_column: str | None = None,
                      text_column: str | None = None) -> tuple[list[HFImage], list[list[str]], str]:
    """Images and their captions (a string or a list of strings per row): ``(refs [N], captions [N][*], name)``."""
    dataset = open_hf(path, split)
    image_col = pick_column(dataset, image_column, IMAGE_COLUMNS, "image", path)
    text_col = pick_column(dataset, text_column, TEXT_COLUMNS, "text", path)
    captions = []
    for row, value in enumerate(dataset[text_col]):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, dict) and isinstance(value.get("raw"), list):  # Karpathy-style {"raw": [...]}
            value = value["raw"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{str(path)!r}: row {row}: field {text_col!r}: expected a string or a list of strings "
                            f"(got {value!r:.60})")
        captions.append(value)
    refs = image_refs(dataset, image_col, path)
    keys = list(image_keys(dataset, image_col))  # read (and hashed) once
    first = {}  # image key -> its first row: rows of one image (one caption per row) become one image, as elsewhere
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    if len(first) < len(refs):
        from clipheads.data.retrieval import merge_duplicate_images

        unique, captions = merge_duplicate_images(keys, captions, str(path))
        refs = [refs[first[key]] for key in unique]
    return refs, captions, _name(path)


def image_keys(dataset, column: str, batch_size: int = 1024):
    """What identifies each row's image without decoding it: the sha1 of its stored bytes, or its path where the
    cell holds only a path (an ``Image`` feature without bytes, a path string). Yields one key per row, in order."""
    import hashlib

    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=batch_size):
        for cell in batch.column(column).to_pylist():
            if isinstance(cell, dict):
                cell = cell.get("bytes") or cell.get("path")
            yield hashlib.sha1(cell).hexdigest() if isinstance(cell, bytes) else cell


def read_hf_classification(path: Path, split: str | None = None, image_column: str | None = None,
                           label_column: str | None = None) -> tuple[list[HFImage], list[int], list[str] | None, str]:
    """Images and integer labels; class names from the label's ``ClassLabel`` feature (``None`` without one)."""
    import datasets

    dataset = open_hf(path, split)
    image_col = pick_column(dataset, image_column, IMAGE_COLUMNS, "image", path)
    label_col = pick_column(dataset, label_column, LABEL_COLUMNS, "label", path)
    feature = dataset.features[label_col]
    labels = dataset[label_col]
    if isinstance(feature, datasets.ClassLabel):
        names = [name.replace("_", " ") for name in feature.names]
    elif all(isinstance(v, str) for v in labels):
        names = sorted(set(labels))
        labels = [names.index(v) for v in labels]
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        names = None
    else:
        raise DataError(f"{str(path)!r}: column {label_col!r} holds neither class ids nor class names")
    return image_refs(dataset, image_col, path), list(labels), names, _name(path)


def _name(path: Path) -> str:
    return path.name if path.is_dir() or is_hub_id(str(path)) else path.stem


GROUP_COLUMNS = ("counterfactual_set", "ctf_set", "group", "set")


def attribute_pairs(names: list[str]) -> list[str]:
    """SocialCounterfactuals' attribute columns: each ``X`` that has an ``X_type`` column beside it (``a1`` with
    ``a1_type``, ``a2`` with ``a2_type``), in column order."""
    return [name for name in names if f"{name}_type" in names]


def neutral_text(caption: str, values: list[str]) -> str:
    """``caption`` without the attribute ``values`` (whole words, any case), its article fixed: ``"A photo of an
    Asian man chef"`` less ``Asian``, ``man`` -> ``"A photo of a chef"``."""
    import re

    text = caption
    for value in sorted({v for v in values if v}, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(value)}(?![\w-])", " ", text, flags=re.IGNORECASE)
    words = text.split()
    for n in range(len(words) - 1):
        if words[n].lower() in ("a", "an"):
            article = "an" if words[n + 1][:1].lower() in "aeiou" else "a"
            words[n] = article.capitalize() if words[n][0].isupper() else article
    return " ".join(words)


def read_hf_counterfactual(path: Path, split: str | None = None, image_column: str | None = None,
                           group_column: str | None = None, attribute_columns: list[str] | None = None,
                           text_column: str | None = None
                           ) -> tuple[list[HFImage], list[str], list[str], list[str], list[str], str]:
    """A counterfactual set as published on the Hub (``Intel/SocialCounterfactuals``: ``image``, ``caption``,
    ``counterfactual_set``, ``a1_type``, ``a1``, ``a2_type``, ``a2``).

    Each row is an image of its group (``group_column``, default ``counterfactual_set``). Its ``attribute`` is the
    ``-``-joined attribute types (``race-gender``: the intersection the set varies) and its ``value`` the
    space-joined values (``Black woman``). ``attribute_columns`` names the value columns: each with an ``X_type``
    column gives its type from there, any other column gives its own name (``race,gender`` for sets with one column
    per attribute); by default every ``X`` with an ``X_type`` beside it. The neutral queries are the captions
    (``text_column``, default ``caption``) without their attribute values (:func:`neutral_text`), each once.

    Returns:
        ``(refs [N], groups [N], attributes [N], values [N], neutral queries [Q], name)``.
    """
    dataset = open_hf(path, split)
    names = list(dataset.column_names)
    image_col = pick_column(dataset, image_column, IMAGE_COLUMNS, "image", path)
    group_col = pick_column(dataset, group_column, GROUP_COLUMNS, "group", path)
    columns = attribute_columns or attribute_pairs(names)
    if not columns:
        raise DataError(f"{str(path)!r} has no attribute columns (SocialCounterfactuals' a1/a1_type, a2/a2_type; "
                        f"columns: {', '.join(names)}); name them with --attribute-columns")
    for column in columns:
        pick_column(dataset, column, (), "attribute", path)
    text_col = pick_column(dataset, text_column, TEXT_COLUMNS, "text", path) if (
        text_column is not None or any(name.lower() in TEXT_COLUMNS for name in names)) else None
    table = dataset.select_columns([c for c in dict.fromkeys(
        [group_col, *columns, *(f"{c}_type" for c in columns if f"{c}_type" in names),
         *([text_col] if text_col else [])])]).to_dict()  # text columns only: the images stay where they are
    groups, attributes, values, queries = [], [], [], []
    for row in range(len(dataset)):
        cells = {c: table[c][row] for c in table}
        bad = [c for c, v in cells.items() if not isinstance(v, str | int) or isinstance(v, bool) or v == ""]
        if bad:
            raise DataError(f"{str(path)!r}: row {row}: field {bad[0]!r}: expected a non-empty string "
                            f"(got {cells[bad[0]]!r:.60})")
        row_values = [str(cells[c]) for c in columns]
        groups.append(str(cells[group_col]))
        attributes.append("-".join(str(cells[f"{c}_type"]) if f"{c}_type" in cells else c for c in columns))
        values.append(" ".join(row_values))
        if text_col is not None:
            queries.append(neutral_text(str(cells[text_col]), row_values))
    if text_col is not None:
        neutral: dict[str, set[str]] = {}
        for group, query in zip(groups, queries, strict=True):
            neutral.setdefault(group, set()).add(query)
        mixed = next((g for g, texts in neutral.items() if len(texts) > 1), None)
        if mixed is not None:  # the captions of a set differ in more than the attribute values: not neutral
            logger.warning("%s: the captions of counterfactual set %r differ beyond their attribute values (%s); the "
                           "derived queries may name an attribute: give neutral queries with --queries", path, mixed,
                           " | ".join(sorted(neutral[mixed])[:2]))
    return (image_refs(dataset, image_col, path), groups, attributes, values, list(dict.fromkeys(queries)),
            _name(path))
