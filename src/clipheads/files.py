"""Small file helpers: atomic writes so that an interrupted run never leaves a half-written result, and the checks
every writing command runs on its output paths before any work (:func:`check_output_dir`, :func:`check_output_file`).

A results folder (one checked with ``products``) lists what clipheads wrote in it in ``clipheads-outputs.json``
(:data:`MANIFEST`, kept by the atomic writers): a later run replaces only listed files, so a user's own
``summary.json`` beside them is refused, never overwritten.

File-system errors become one-line :class:`~clipheads.errors.OutputError` messages that name the path and what to do.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import math
import os
import stat
import tempfile
from pathlib import Path

import torch

from clipheads.errors import OutputError

# what to do about the errors a write can meet
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write elsewhere",
    errno.EFBIG: "the file is too large for this file system: write elsewhere",
    errno.EACCES: "no permission: fix the permissions or write elsewhere",
    errno.EPERM: "no permission: fix the permissions or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EISDIR: "a folder is in the way: give a file path",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "a file is in the way: choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}
WRITE_ERRNOS = frozenset(_ADVICE)
# the most of an unwritable result the CLI prints instead (characters)
MAX_PAYLOAD = 5_000_000
# the list of the files clipheads wrote in a results folder, and its format tag
MANIFEST = "clipheads-outputs.json"
MANIFEST_FORMAT = "clipheads.outputs/1"
# results folders checked in this process (real paths): what the atomic writers write there is listed in MANIFEST
_RESULT_DIRS: set[str] = set()


def output_error(exc: OSError, path: str | os.PathLike, payload: str | None = None,
                 action: str = "cannot write") -> OutputError:
    """A one-line :class:`OutputError` for an ``OSError`` met while writing ``path`` (``action`` starts the line)."""
    advice = _ADVICE.get(exc.errno, "check the path or write elsewhere")
    where = exc.filename if exc.filename not in (None, "") else path
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"{action} {str(where)!r}: {reason}; {advice}", path=Path(path), payload=payload)


def _umask() -> int:
    """The process umask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The mode a new file at ``path`` gets: that of the file it replaces, else ``0o666 & ~umask`` (as ``open``)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _write_atomic(path: str | os.PathLike, payload: bytes, text: str | None) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _mode_for(path))  # mkstemp makes 0600 files
            handle.write(payload)
        os.replace(tmp, path)
        if path.name != MANIFEST and os.path.realpath(path.parent) in _RESULT_DIRS:
            _list_output(path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise output_error(exc, path, text) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``.

    The file gets the mode of the file it replaces, else ``0o666 & ~umask``. NaN/inf are written as ``null``.

    Raises:
        OutputError: the file cannot be written (its ``payload`` holds the JSON text, so that it is not lost).
    """
    text = json.dumps(_finite(data), indent=1, default=_json_default, allow_nan=False) + "\n"
    _write_atomic(path, text.encode(), text)


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write bytes to a temporary file in the same folder, then rename it over ``path`` (mode as
    :func:`write_json_atomic`).

    Raises:
        OutputError: the file cannot be written.
    """
    _write_atomic(path, payload, None)


def read_manifest(folder: str | os.PathLike) -> set[str] | None:
    """The names listed in ``folder``'s :data:`MANIFEST` (files clipheads wrote there); ``None`` if it has none.

    Raises:
        OutputError: a file of that name that is not clipheads' list (one line; it is never overwritten).
    """
    path = Path(folder) / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and isinstance(data.get("files"), list)
            and all(isinstance(name, str) for name in data["files"])):
        raise OutputError(f"{str(path)!r} exists and is not clipheads' list of its outputs; clipheads does not "
                          "overwrite it: move it or choose another output folder", path=path)
    return set(data["files"])


def _list_output(path: Path) -> None:
    """Add ``path``'s name to its folder's :data:`MANIFEST` (written atomically)."""
    listed = read_manifest(path.parent) or set()
    if path.name not in listed:
        _write_atomic(path.parent / MANIFEST, (json.dumps({"format": MANIFEST_FORMAT, "files": sorted(
            listed | {path.name})}, indent=1) + "\n").encode(), None)


def _first_existing(path: Path) -> tuple[Path, list[Path]]:
    """The deepest existing ancestor of ``path`` (or ``path`` itself) and the parts below it that do not exist."""
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    return current, missing[::-1]


def _check_creatable(path: Path, what: str) -> None:
    """``path`` does not exist: its deepest existing ancestor must be a writable folder."""
    base, _ = _first_existing(path)
    if not base.is_dir():
        raise OutputError(f"cannot write {what} {str(path)!r}: {str(base)!r} is a file, not a folder; choose another "
                          "path", path=path)
    _check_writable_dir(base, path, what)


def _check_writable_dir(folder: Path, path: Path, what: str) -> None:
    try:
        writable = os.access(folder, os.W_OK | os.X_OK)  # access(2) also fails on a read-only mount
    except OSError as exc:
        raise output_error(exc, path) from None
    if not writable:
        readonly = _is_read_only_mount(folder)
        advice = "the file system is read-only at" if readonly else "no permission to write in"
        raise OutputError(f"cannot write {what} {str(path)!r}: {advice} {str(folder)!r}; "
                          f"{'write elsewhere' if readonly else 'fix the permissions or write elsewhere'}", path=path)


def _is_read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output_dir(path: str | os.PathLike, products: dict[str, str] | None = None,
                     marker: str | None = None) -> Path:
    """Check, before any work, that an output folder can be written; create nothing.

    Args:
        path: the folder (it may not exist yet: then its deepest existing ancestor must be a writable folder).
        products: what the command writes there, ``{name: kind}`` with kind ``"json"``, ``"png"``, ``"html"``,
            ``"text"`` or ``"dir"``; a name may end in ``*`` (``"mask_*.json"``). An existing file of that name must be
            of that kind and listed in the folder's :data:`MANIFEST` (written there by clipheads), so that a user's
            file is never overwritten; a folder (``"dir"``) is checked by its own marker where it is written (a
            world's ``world.json``). The folder is then a results folder for this process: every file written
            there with :func:`write_json_atomic`/:func:`write_bytes_atomic` is added to its :data:`MANIFEST`.
        marker: for folders whose files clipheads writes as a whole (checkpoints, search runs): the file an earlier
            clipheads run left there; a non-empty folder without it is refused.

    Returns:
        ``path`` as given.

    Raises:
        OutputError: a file is where the folder should be or above it, the folder is not writable (permission,
            read-only file system), an existing entry has a product's name but another kind or is not listed in the
            folder's :data:`MANIFEST`, a :data:`MANIFEST` that is not clipheads', or ``marker`` is missing from a
            non-empty folder.
    """
    path = Path(path)
    if os.path.lexists(path):
        if not path.is_dir():
            raise OutputError(f"cannot write to folder {str(path)!r}: it is a file; give a folder path", path=path)
        _check_writable_dir(path, path, "to folder")
        if marker is not None and not (path / marker).is_file() and any(not _is_temp(e.name) for e in path.iterdir()):
            raise OutputError(f"{str(path)!r} is not empty and holds no {marker} of an earlier clipheads run; "
                              "clipheads does not mix its files with others: choose a new or empty folder", path=path)
        listed = read_manifest(path) if products else None
        for entry in sorted(path.iterdir()):
            kind = _product_kind(entry.name, products or {})
            if kind is not None and not _is_kind(entry, kind):
                raise OutputError(f"{str(entry)!r} exists and is not {_KIND_TEXT[kind]} clipheads writes; clipheads "
                                  "does not overwrite it: move it or choose another output folder", path=entry)
            if kind is not None and kind != "dir" and entry.name not in (listed or ()):
                raise OutputError(f"{str(entry)!r} exists and is not on the list of files clipheads wrote there "
                                  f"({MANIFEST}; an older clipheads kept none); clipheads does not overwrite it: move "
                                  "it or choose another output folder", path=entry)
    else:
        _check_creatable(path, "folder")
    if products:
        _RESULT_DIRS.add(os.path.realpath(path))
    return path


def enclosing_folder(path: str | os.PathLike, marker: str, is_own=None) -> Path | None:
    """The nearest folder strictly above ``path`` that holds the file ``marker`` (for which ``is_own(file)`` is true,
    when given: the marker is really clipheads'), e.g. the run folder a new ``--out`` would be nested in; ``None``
    if there is none."""
    for folder in Path(os.path.abspath(path)).parents:
        candidate = folder / marker
        if candidate.is_file() and (is_own is None or is_own(candidate)):
            return folder
    return None


def check_output_file(path: str | os.PathLike, kind: str = "json",
                      inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Check, before any work, that an output file can be written; create nothing.

    Args:
        path: the file to write.
        kind: what clipheads writes there (``"json"``, ``"png"``, ``"html"``, ``"text"``): an existing file is
            replaced only if it is of this kind (never a user's image written over by a JSON, say).
        inputs: the command's input files, ``{option: path}`` (``None`` values skipped): the output may not be one
            of them (``eval --data w/retrieval.json --out w/retrieval.json`` replaced the dataset by its result).

    Returns:
        ``path`` as given.

    Raises:
        OutputError: ``path`` is a folder, lies under a file, its folder is not writable, holds a file of another
            kind, or is one of ``inputs``.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write file {str(path)!r}: it is a folder; give a file path", path=path)
    for option, source in (inputs or {}).items():
        if source is not None and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise OutputError(f"the output {str(path)!r} is the input file of {option}; clipheads does not overwrite "
                              "its inputs: choose another output path", path=path)
    if os.path.lexists(path):
        if not _is_kind(path, kind):
            raise OutputError(f"{str(path)!r} exists and is not {_KIND_TEXT[kind]}; clipheads does not overwrite it: "
                              "choose another path or delete it", path=path)
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write file {str(path)!r}: no permission; fix the permissions or write "
                              "elsewhere", path=path)
        _check_writable_dir(path.parent, path, "file")
    else:
        _check_creatable(path, "file")
    return path


def _is_temp(name: str) -> bool:
    """A temporary file of an atomic write or a writability probe (``.NAME.XXXX.tmp``), possibly another process'."""
    return name.startswith(".") and name.endswith(".tmp")


_KIND_TEXT = {"json": "a JSON file", "png": "a PNG image", "html": "an HTML file", "text": "a text file",
              "dir": "a folder"}


def _product_kind(name: str, products: dict[str, str]) -> str | None:
    return next((kind for pattern, kind in products.items() if fnmatch.fnmatchcase(name, pattern)), None)


def _is_kind(path: Path, kind: str) -> bool:
    """Whether ``path`` is an entry of ``kind`` (a file clipheads could have written there)."""
    if kind == "dir":
        return path.is_dir() and not path.is_symlink()
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
            if kind == "json":
                json.loads(head + handle.read())
                return True
    except (OSError, ValueError):
        return False
    if kind == "png":
        return head.startswith(b"\x89PNG\r\n\x1a\n")
    if kind == "html":
        return head.lstrip().lower().startswith((b"<!doctype html", b"<html"))
    if kind == "text":
        return b"\0" not in head
    raise ValueError(f"unknown output kind {kind!r}")


def _finite(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return _finite(value.detach().cpu().tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return _finite(value.item())
    if hasattr(value, "to_dict"):
        return _finite(value.to_dict())
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
