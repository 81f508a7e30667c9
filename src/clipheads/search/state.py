"""The output folder of one search: its configuration, checkpoints, history and results, all written atomically.

Re-running the same command against the folder resumes from the last checkpoint; a different configuration is
refused instead of mixing two runs in one folder.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from clipheads.errors import ClipHeadsError
from clipheads.files import write_bytes_atomic, write_json_atomic
from clipheads.runtime import run_meta
from clipheads.search.distributed import SINGLE, Distributed

CONFIG = "config.json"
STATE = "state.json"
HISTORY = "history.jsonl"


class ConfigMismatchError(ClipHeadsError):
    """An output folder holds a run with another configuration."""


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
        config: everything that defines the run (strategy, model, data, split, operator, hyper-parameters, seed).
        distributed: only the main rank writes.
    """

    def __init__(self, path: str | os.PathLike, config: dict, distributed: Distributed = SINGLE) -> None:
        self.path = Path(path)
        self.config = _plain(config)
        self.distributed = distributed
        if distributed.is_main:
            self._claim()
        distributed.barrier()
        if not distributed.is_main:
            self._check(json.loads((self.path / CONFIG).read_text()))

    def _claim(self) -> None:
        config_path = self.path / CONFIG
        if config_path.exists():
            try:
                existing = json.loads(config_path.read_text())
            except json.JSONDecodeError:
                raise ConfigMismatchError(f"{config_path} is not valid JSON; use another --out folder") from None
            self._check(existing)
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise ConfigMismatchError(f"{self.path} is not empty and holds no clipheads search; use another "
                                          "--out folder")
            write_json_atomic(config_path, self.config)

    def _check(self, existing: dict) -> None:
        if existing == self.config:
            return
        keys = sorted(set(existing) | set(self.config))
        changes = [f"{k}: {existing.get(k)!r} -> {self.config.get(k)!r}" for k in keys
                   if existing.get(k) != self.config.get(k)]
        raise ConfigMismatchError(f"{self.path} holds a search with another configuration ({'; '.join(changes)}); "
                                  "re-run with the same options to resume it, or use another --out folder")

    # --------------------------------------------------------------- checkpoints
    def load_state(self, name: str = STATE) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def save_state(self, state: dict, name: str = STATE) -> None:
        if self.distributed.is_main:
            write_json_atomic(self.path / name, state)

    def load_tensors(self, name: str) -> dict | None:
        path = self.path / name
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

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
