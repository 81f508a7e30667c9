"""What makes two runs the same run: content fingerprints of files, image sets and model weights, and the comparison
that names what changed.

A resumable command (``scan``, ``layers``, ``search``, ``ccs``) writes a :class:`RunKey` next to its checkpoints and
resumes only when the new run's key is equal; otherwise it refuses with one line naming each change, e.g.
``--precision changed from fp32 to bf16; the dataset file differs (content changed)``.

What is keyed (compared): every option that changes results, the dataset file's sha256, the size and modification
time of every image it lists (in order, with the path relative to the dataset's folder), the sha256 of any other
input file (templates) and a sha256 over the model's weights (every state_dict tensor's name, dtype, shape and
bytes: exact and independent of where the weights came from; about a second for ViT-B on one CPU core).
Paths are resolved to absolute paths for the record, but a file's identity is its content: the same relative
``--data`` from another working folder resumes only if that file and its images are the same.

What is recorded but not compared (``runtime``): ``--device``, ``--batch-size`` (where it is not a training
hyper-parameter), ``--num-workers``. They change no result in exact arithmetic; another device or batch size may
change the last bits of fp32 sums, so a resumed run can differ from an uninterrupted one in the last digits.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipheads.errors import ClipHeadsError

VERSION = 1
_CHUNK = 1 << 20
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weight version, WeightsKey)


class RunKeyError(ClipHeadsError):
    """A folder holds a run with other inputs or options; the message names what changed."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileKey:
    """One input file: its resolved path (for the record) and its content (``size`` in bytes, ``sha256``)."""

    path: str
    size: int
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileKey:
        """Fingerprint ``path``: a file by its bytes; a folder (``size`` -1) by the sha256 of the relative path, size
        and modification time of every file under it (stats only: cheap for an image folder or a saved model)."""
        resolved = Path(path).resolve()
        try:
            if resolved.is_dir():
                files = sorted(p for p in resolved.rglob("*") if p.is_file())
                return cls(str(resolved), -1, ImagesKey.of(files, resolved).digest)
            return cls(str(resolved), resolved.stat().st_size, file_sha256(resolved))
        except OSError as exc:
            raise ClipHeadsError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping) -> FileKey:
        return cls(str(data["path"]), int(data["size"]), str(data["sha256"]))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ImagesKey:
    """The images a dataset lists: ``count`` and a sha256 over each image's path relative to ``root``, size and
    modification time (ns), in order; a missing image counts with size and time -1. Stats only: no image is read."""

    count: int
    digest: str

    @classmethod
    def of(cls, paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> ImagesKey:
        root = Path(root).resolve()
        digest, count = hashlib.sha256(), 0
        for path in paths:
            if hasattr(path, "stat_key"):  # an image inside a shard or a dataset table (clipheads.data.ImageRef)
                name, (size, mtime) = str(path), path.stat_key()
                digest.update(f"{name}\0{size}\0{mtime}\n".encode())
                count += 1
                continue
            path = Path(path).resolve()
            try:
                stat = path.stat()
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:
                size = mtime = -1
            name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
            digest.update(f"{name}\0{size}\0{mtime}\n".encode())
            count += 1
        return cls(count, digest.hexdigest())

    @classmethod
    def from_dict(cls, data: Mapping) -> ImagesKey:
        return cls(int(data["count"]), str(data["digest"]))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DatasetKey:
    """A dataset: its file (or folder) and the images it lists (see :class:`FileKey`, :class:`ImagesKey`)."""

    file: FileKey
    images: ImagesKey

    @classmethod
    def of(cls, path: str | os.PathLike, image_paths: Iterable[str | os.PathLike]) -> DatasetKey:
        """``path`` is a dataset file or folder, or a name that is no path (a Hugging Face Hub id, a shard pattern):
        then the name and the images (their names, which hold a Hugging Face dataset's fingerprint, and the stats of
        what holds them) key the dataset."""
        path = Path(path)
        if not path.exists() and str(path):
            file = FileKey(str(path), -1, hashlib.sha256(str(path).encode()).hexdigest())
            return cls(file, ImagesKey.of(image_paths, Path.cwd()))
        return cls(FileKey.of(path), ImagesKey.of(image_paths, path if path.is_dir() else path.parent))

    @classmethod
    def from_dict(cls, data: Mapping) -> DatasetKey:
        return cls(FileKey.from_dict(data["file"]), ImagesKey.from_dict(data["images"]))

    def to_dict(self) -> dict:
        return {"file": self.file.to_dict(), "images": self.images.to_dict()}


@dataclass(frozen=True)
class WeightsKey:
    """A model's weights: sha256 over every state_dict entry's name, dtype, shape and bytes, in state_dict order;
    ``dtype`` of the first floating-point tensor (the precision the weights are held in)."""

    sha256: str
    n_tensors: int
    n_bytes: int
    dtype: str

    @classmethod
    def of(cls, model: torch.nn.Module) -> WeightsKey:
        """Hash ``model``'s state_dict (once per model object and weight version: in-place updates are noticed
        through the tensors' version counters, replaced or cast tensors through their storage and dtype)."""
        version = tuple((t.data_ptr(), t.dtype, t._version) for t in (*model.parameters(), *model.buffers()))
        known = _WEIGHTS.get(model)
        if known is not None and known[0] == version:
            return known[1]
        key = cls._hash(model)
        _WEIGHTS[model] = (version, key)
        return key

    @classmethod
    def _hash(cls, model: torch.nn.Module) -> WeightsKey:
        digest, n_bytes, n_tensors, dtype = hashlib.sha256(), 0, 0, ""
        for name, tensor in model.state_dict().items():
            if tensor.is_meta:
                continue
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
            data = flat.view(torch.uint8).numpy() if flat.numel() else b""
            digest.update(memoryview(data))
            n_bytes += len(data)
            n_tensors += 1
            if not dtype and flat.is_floating_point():
                dtype = str(flat.dtype).removeprefix("torch.")
        return cls(digest.hexdigest(), n_tensors, n_bytes, dtype)

    @classmethod
    def from_dict(cls, data: Mapping) -> WeightsKey:
        return cls(str(data["sha256"]), int(data["n_tensors"]), int(data["n_bytes"]), str(data["dtype"]))

    def to_dict(self) -> dict:
        return asdict(self)


_KINDS = {"file": FileKey, "dataset": DatasetKey, "weights": WeightsKey}


def _kind(value) -> str:
    for kind, cls in _KINDS.items():
        if isinstance(value, cls):
            return kind
    raise TypeError(f"not a fingerprint: {type(value).__name__}")


@dataclass
class RunKey:
    """Everything that determines a run's results, and what it ran on.

    Args:
        options: what the user chose, by option name (``precision``, ``op``, ``seed`` ...); JSON values.
        inputs: the fingerprints of what was read: ``name -> FileKey | DatasetKey | WeightsKey | None`` (e.g.
            ``data``, ``report_data``, ``templates``, ``weights``).
        runtime: recorded, never compared (``device``, ``num_workers`` ...).
    """

    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, FileKey | DatasetKey | WeightsKey | None] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Flat JSON form: the options at the top level, then ``inputs`` (each with its ``kind``), ``runtime`` and
        ``run_key`` (the format version)."""
        inputs = {name: None if key is None else {"kind": _kind(key), **key.to_dict()}
                  for name, key in self.inputs.items()}
        return {**self.options, "inputs": inputs, "runtime": dict(self.runtime), "run_key": VERSION}

    @classmethod
    def from_dict(cls, data: Mapping) -> RunKey:
        """Inverse of :meth:`to_dict`; :class:`RunKeyError` when ``data`` holds no run key of this version."""
        if data.get("run_key") != VERSION:
            raise RunKeyError("no run key of this clipheads version")
        options = {k: v for k, v in data.items() if k not in ("inputs", "runtime", "run_key")}
        inputs = {}
        for name, value in data.get("inputs", {}).items():
            if value is None:
                inputs[name] = None
            else:
                value = dict(value)
                inputs[name] = _KINDS[value.pop("kind")].from_dict(value)
        return cls(options, inputs, dict(data.get("runtime", {})))

    def changes(self, new: RunKey) -> list[str]:
        """One phrase per difference from this (old) key to ``new``, e.g. ``--precision changed from fp32 to bf16``;
        empty when the runs are the same (``runtime`` is not compared)."""
        found = []
        for name in sorted(set(self.options) | set(new.options), key=_option_order):
            old_value, new_value = self.options.get(name, _MISSING), new.options.get(name, _MISSING)
            if old_value != new_value:
                found.append(f"{_flag(name)} changed from {_show(old_value)} to {_show(new_value)}")
        precision_changed = any(p.startswith("--precision") for p in found)
        for name in list(dict.fromkeys([*self.inputs, *new.inputs])):
            old_key, new_key = self.inputs.get(name), new.inputs.get(name)
            if old_key != new_key:
                phrase = _input_change(name, old_key, new_key, precision_changed)
                if phrase:
                    found.append(phrase)
        return found


class _Missing:
    def __repr__(self) -> str:
        return "(not recorded)"


_MISSING = _Missing()
_LABELS = {"command": "the command", "data": "--data", "report_data": "--report-data", "templates": "--templates",
           "weights": "the model's weights", "descriptions": "the descriptions file"}
_WHAT = {"data": "the dataset file", "report_data": "the held-out dataset file", "templates": "the templates file"}


def _option_order(name: str) -> tuple[int, str]:
    return (0 if name == "command" else 1, name)


def _flag(name: str) -> str:
    if name in _LABELS:
        return _LABELS[name]
    return name if name.startswith(("-", " ")) or " " in name else "--" + name.replace("_", "-")


def _show(value) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(map(_show, value)) or "(none)"
    return repr(value) if isinstance(value, _Missing) else str(value)


def _input_change(name: str, old, new, precision_changed: bool) -> str:
    what = _WHAT.get(name, _LABELS.get(name, name))
    if old is None or new is None:
        return f"{what} changed from {_path_of(old)} to {_path_of(new)}"
    if isinstance(old, WeightsKey) and isinstance(new, WeightsKey):
        if old.dtype != new.dtype:
            return "" if precision_changed else f"the model's weights differ (held as {old.dtype}, now {new.dtype})"
        return "the model's weights differ"
    if isinstance(old, DatasetKey) and isinstance(new, DatasetKey):
        phrases = []
        if old.file != new.file:
            phrases.append(_file_change(what, old.file, new.file))
        if old.images != new.images:
            count = "" if old.images.count == new.images.count else \
                f"{old.images.count} -> {new.images.count} images; "
            phrases.append(f"the images it lists differ ({count}names, sizes or modification times changed)")
        return "; ".join(p for p in phrases if p)
    if isinstance(old, FileKey) and isinstance(new, FileKey):
        return _file_change(what, old, new)
    return f"{what} differs"


def _path_of(key) -> str:
    if key is None:
        return "(not given)"
    file = key.file if isinstance(key, DatasetKey) else key
    return file.path if isinstance(file, FileKey) else "(given)"


def _file_change(what: str, old: FileKey, new: FileKey) -> str:
    if old.sha256 == new.sha256:  # same content elsewhere: not a change of results
        return ""
    where = "" if old.path == new.path else f": {old.path} -> {new.path}"
    return f"{what} differs (content changed{where})"


def check_same_run(old: Mapping, new: RunKey, where: str, remedy: str,
                   error: type[ClipHeadsError] = RunKeyError) -> None:
    """Raise ``error`` (one line) unless ``old`` (the JSON form stored in ``where``) is the same run as ``new``.

    ``remedy`` ends the message (e.g. ``use another --out folder``).
    """
    try:
        previous = RunKey.from_dict(old)
    except (RunKeyError, KeyError, TypeError, ValueError, AttributeError):
        raise error(f"{where} was written by another clipheads version and does not record what its results "
                          f"depend on, so it cannot be resumed safely; {remedy}") from None
    changes = [c for c in previous.changes(new) if c]
    if changes:
        raise error(f"{where} holds another run ({'; '.join(changes)}); re-run with the same "
                          f"options and inputs to resume it, or {remedy}")
