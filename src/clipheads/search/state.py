"""The output folder of one search: its configuration, checkpoints, history and results, all written atomically.

Re-running the same command against the folder resumes from the last checkpoint; a different configuration, or
other inputs (dataset content, images, templates, model weights: see :mod:`clipheads.runkey`), is refused with one
line naming what changed instead of mixing two runs in one folder.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from clipheads.errors import ClipHeadsError
from clipheads.files import write_bytes_atomic, write_json_atomic
from clipheads.runkey import RunKey, RunKeyError, check_same_run
from clipheads.runtime import run_meta
from clipheads.search.distributed import SINGLE, Distributed

CONFIG = "config.json"
STATE = "state.json"
HISTORY = "history.jsonl"


def is_run_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the ``config.json`` of a clipheads run folder (a JSON object with a ``run_key``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "run_key" in data


class ConfigMismatchError(RunKeyError):
    """An output folder holds a run with another configuration."""


class DamagedStateError(ClipHeadsError):
    """A checkpoint of an output folder cannot be read back (truncated, edited, written by something else)."""


def _plain(value):
    """JSON-normalised copy (tuples -> lists, tensors -> lists) so that configurations compare as written."""
    def default(obj):
        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        return str(obj)

    return json.loads(json.dumps(value, default=default))


class RunFolder:
    """``out/`` of a search: ``config.json``, ``state.json`` (checkpoint), ``history.jsonl`` and the results.

    Args:
        path: the folder (created if needed).
        config: everything that defines the run: a :class:`~clipheads.runkey.RunKey` (options, input fingerprints,
            runtime) or its JSON form, or a plain dict of options.
        distributed: only the main rank writes.

    Raises:
        ConfigMismatchError: the folder holds another run (the message names each change), or files that are not a
            clipheads search.
    """

    def __init__(self, path: str | os.PathLike, config: dict | RunKey, distributed: Distributed = SINGLE) -> None:
        self.path = Path(path)
        self.config = _plain(config.to_dict() if isinstance(config, RunKey) else config)
        self.distributed = distributed
        if distributed.is_main:
            self._claim()
        distributed.barrier()
        if not distributed.is_main:
            self._check(json.loads((self.path / CONFIG).read_text()))

    @classmethod
    def check(cls, path: str | os.PathLike, config: dict | RunKey) -> None:
        """Refuse (:class:`ConfigMismatchError`) before any work when ``path`` holds another run or other files;
        writes nothing (the folder is claimed when the run starts)."""
        folder = cls.__new__(cls)
        folder.path = Path(path)
        folder.config = _plain(config.to_dict() if isinstance(config, RunKey) else config)
        folder._verify()

    def _verify(self) -> bool:
        """Whether the folder already holds this run (refuses another run, or files that are not a search)."""
        config_path = self.path / CONFIG
        if config_path.exists():
            try:
                existing = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigMismatchError(f"{config_path} is not valid JSON; use another --out folder") from None
            self._check(existing)
            return True
        if self.path.exists() and any(self.path.iterdir()):
            raise ConfigMismatchError(f"{self.path} is not empty and holds no clipheads search; use another "
                                      "--out folder")
        return False

    def _claim(self) -> None:
        if not self._verify():
            write_json_atomic(self.path / CONFIG, self.config)

    def _check(self, existing: dict) -> None:
        if existing == self.config:
            return
        if not isinstance(existing, dict):
            raise ConfigMismatchError(f"{self.path / CONFIG} is not a clipheads search configuration; use another "
                                      "--out folder")
        keyed = "run_key" in self.config
        new = RunKey.from_dict(self.config) if keyed else RunKey(options=self.config)
        old = existing if keyed else RunKey(options=existing).to_dict()
        check_same_run(old, new, f"{self.path}", "use another --out folder", error=ConfigMismatchError)

    # --------------------------------------------------------------- checkpoints
    def damaged(self, name: str, reason: str) -> DamagedStateError:
        """The one-line error for a checkpoint ``name`` of this folder that cannot be used."""
        return DamagedStateError(f"{self.path / name} is damaged ({reason}); delete it to restart this run from "
                                 "the beginning, or use another --out folder")

    def load_state(self, name: str = STATE, schema=None) -> dict | None:
        """The checkpoint ``name`` (``None`` if there is none), validated against ``schema`` (a ``TypedDict`` or
        any type pydantic's ``TypeAdapter`` takes) when given.

        Raises:
            DamagedStateError: the file is not JSON or does not have the fields and types of ``schema``.
        """
        path = self.path / name
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self.damaged(name, f"not valid JSON: {exc}") from None
        except OSError as exc:
            raise self.damaged(name, f"cannot be read: {exc.strerror or exc}") from None
        if schema is None:
            return state
        from pydantic import TypeAdapter, ValidationError

        try:
            return TypeAdapter(schema).validate_python(state)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "the top level"
            raise self.damaged(name, f"{where}: {error['msg']}") from None

    def save_state(self, state: dict, name: str = STATE) -> None:
        if self.distributed.is_main:
            write_json_atomic(self.path / name, state)

    def load_tensors(self, name: str) -> dict | None:
        path = self.path / name
        if not path.exists():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... on a damaged file
            raise self.damaged(name, f"not a readable torch checkpoint: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise self.damaged(name, f"holds a {type(data).__name__}, not a checkpoint dictionary")
        return data

    def save_tensors(self, data: dict, name: str) -> None:
        if self.distributed.is_main:
            buffer = io.BytesIO()
            torch.save(data, buffer)
            write_bytes_atomic(self.path / name, buffer.getvalue())

    # ------------------------------------------------------------------ results
    def write_history(self, records: list[dict]) -> None:
        """Rewrite ``history.jsonl`` whole (a resumed run never duplicates or loses lines)."""
        if self.distributed.is_main:
            lines = "".join(json.dumps(_plain(r), allow_nan=False) + "\n" for r in records)
            write_bytes_atomic(self.path / HISTORY, lines.encode())

    def write_json(self, name: str, data) -> None:
        """Write a results file; a dict gets ``"run"``: versions, threads, host (:func:`clipheads.runtime.run_meta`)."""
        if self.distributed.is_main:
            if isinstance(data, dict) and "run" not in data:
                data = {**data, "run": run_meta()}
            write_json_atomic(self.path / name, data)

    def file(self, name: str) -> Path:
        return self.path / name
