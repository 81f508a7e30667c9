"""Concept labels and the Concept Consistency Score (CCS) of every head.

For a head described by ``k`` texts, a labelling judge names the concept they share, and every judge says which
of the ``k`` texts are consistent with that label. A text counts as consistent when more than half of the judges
say so (a tie counts as not consistent); ``CCS(h)`` is the number of consistent texts, ``0..k``. Heads fall into
groups: ``high`` (CCS = k), ``moderate`` (1 < CCS < k) and ``low`` (CCS <= 1).

Progress is written to a checkpoint file after every head, so an interrupted run (an endpoint that went down)
resumes where it stopped: finished heads with the same descriptions are not asked again. The checkpoint records
what the judging depends on (:func:`judges_key`: the judges, their thresholds, LLM endpoints, models and prompts,
the weights of a CLIP judge's model); a checkpoint made otherwise is refused with one line naming the change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipheads.errors import DataError
from clipheads.explain.judges import Judge, JudgeError
from clipheads.files import write_json_atomic
from clipheads.heads import head_label, parse_head
from clipheads.runkey import RunKey, WeightsKey, check_same_run

logger = logging.getLogger(__name__)

FORMAT = "clipheads.CCS/1"
GROUPS = ("high", "moderate", "low")


@dataclass
class HeadConcept:
    """One head's label, its descriptions and which of them the judges found consistent with the label."""

    layer: int
    head: int
    label: str
    descriptions: list[str]
    consistent: list[bool]
    votes: dict[str, list[bool]] = field(default_factory=dict)  # judge name -> its answer per description

    @property
    def head_label(self) -> str:
        return head_label(self.layer, self.head)

    @property
    def ccs(self) -> int:
        return int(sum(self.consistent))

    def to_dict(self) -> dict:
        fields = asdict(self)
        del fields["layer"], fields["head"]
        return {"head": self.head_label, "label": self.label, "ccs": self.ccs, **fields}

    @classmethod
    def from_dict(cls, data: dict) -> HeadConcept:
        return cls(*parse_head(data["head"]), str(data["label"]), list(data["descriptions"]),
                   [bool(v) for v in data["consistent"]], {k: list(v) for k, v in data.get("votes", {}).items()})


def ccs_group(ccs: int, k: int) -> str:
    """``high`` (CCS = k), ``low`` (CCS <= 1) or ``moderate`` (in between)."""
    return "high" if ccs >= k else "low" if ccs <= 1 else "moderate"


def majority(votes: Sequence[Sequence[bool]]) -> list[bool]:
    """Per position, True when more than half of the vote lists say True."""
    return [sum(column) * 2 > len(votes) for column in zip(*votes, strict=True)]


@dataclass
class CCSResult:
    """The CCS of every described head of a model with ``shape = (n_layers, n_heads)``."""

    heads: list[HeadConcept]
    k: int
    shape: tuple[int, int]
    judges: list[str]
    labeler: str
    meta: dict = field(default_factory=dict)

    def __getitem__(self, head: str | tuple[int, int]) -> HeadConcept:
        layer, h = parse_head(head)
        for concept in self.heads:
            if (concept.layer, concept.head) == (layer, h):
                return concept
        raise KeyError(head_label(layer, h))

    def scores(self) -> torch.Tensor:
        """``[n_layers, n_heads]`` CCS per head (NaN for heads that were not described)."""
        table = torch.full(self.shape, float("nan"))
        for concept in self.heads:
            table[concept.layer, concept.head] = concept.ccs
        return table

    def group(self, name: str) -> list[tuple[int, int]]:
        """The heads of a CCS group (``high``, ``moderate`` or ``low``), in layer-head order."""
        if name not in GROUPS:
            raise DataError(f"unknown CCS group {name!r}; choose one of {', '.join(GROUPS)}")
        return sorted((c.layer, c.head) for c in self.heads if ccs_group(c.ccs, self.k) == name)

    def top(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` heads with the highest CCS (ties: the head explaining more variance first, then layer-head
        order; descriptions are stored most important first, so the order is stable)."""
        ranked = sorted(self.heads, key=lambda c: (-c.ccs, -self.meta.get("variance", {}).get(c.head_label, 0.0),
                                                   c.layer, c.head))
        return [(c.layer, c.head) for c in ranked[:n]]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "k": self.k, "n_layers": self.shape[0], "n_heads": self.shape[1],
                "judges": self.judges, "labeler": self.labeler, "meta": self.meta,
                "groups": {name: [head_label(*h) for h in self.group(name)] for name in GROUPS},
                "heads": [c.to_dict() for c in self.heads]}

    @classmethod
    def from_dict(cls, data: dict, source: str = "CCS result") -> CCSResult:
        try:
            return cls([HeadConcept.from_dict(h) for h in data["heads"]], int(data["k"]),
                       (int(data["n_layers"]), int(data["n_heads"])), list(data["judges"]), str(data["labeler"]),
                       data.get("meta", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: not a clipheads CCS result ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | os.PathLike) -> Path:
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CCSResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"CCS file {str(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"CCS file {str(path)!r} is not valid JSON") from None
        return cls.from_dict(data, source=str(path))


_JUDGE_OPTIONS = {"threshold": "--threshold", "base_url": "--llm-base-url", "model": "--llm-model",
                  "temperature": "the temperature", "concepts": "the concept vocabulary"}
_PROMPTS = ("SYSTEM_PROMPT", "LABEL_PROMPT", "JUDGE_PROMPT")


def _simple(value) -> bool:
    if isinstance(value, list | tuple):
        return all(_simple(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def judges_key(judges: Sequence[Judge], labeler: Judge) -> RunKey:
    """What a CCS checkpoint depends on besides each head's descriptions (those are compared head by head): the
    judges' names, the labelling judge, each judge's threshold, LLM base URL, model name, temperature and concept
    vocabulary where it has them, the sha256 of the LLM prompts, and the weights of a CLIP judge's model."""
    options: dict = {"judge": [j.name for j in judges], "the labelling judge": labeler.name}
    inputs: dict = {}
    for judge in dict.fromkeys([*judges, labeler]):
        for attribute, flag in _JUDGE_OPTIONS.items():
            value = getattr(judge, attribute, None)
            if value is not None and _simple(value):
                options[f"{flag} of the {judge.name} judge"] = list(value) if isinstance(value, tuple) else value
        if getattr(judge, "base_url", None) is not None:  # an LLM judge: its prompts, from the judge's module
            module = sys.modules.get(type(judge).__module__)
            prompts = "\0".join(str(getattr(module, name, "")) for name in _PROMPTS)
            options[f"the prompts of the {judge.name} judge"] = hashlib.sha256(prompts.encode()).hexdigest()[:16]
        backend = getattr(judge, "model", None)
        if isinstance(getattr(backend, "model", None), torch.nn.Module):  # a judge over a CLIP model's text tower
            inputs["weights" if "weights" not in inputs else f"weights of {judge.name}"] = WeightsKey.of(backend.model)
    return RunKey(options, inputs)


def _load_checkpoint(path: Path | None, key: RunKey) -> dict[str, HeadConcept]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        heads = {h["head"]: HeadConcept.from_dict(h) for h in data["heads"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise DataError(f"checkpoint {str(path)!r} is not a clipheads CCS checkpoint; delete it to start over"
                        ) from None
    check_same_run(data.get("run_key") or {}, key, f"checkpoint {path}", "delete it (or use another --out folder) "
                   "to start over")
    return heads


def check_checkpoint(checkpoint: str | os.PathLike, judges: Judge | Sequence[Judge],
                     labeler: Judge | None = None) -> None:
    """Refuse (:class:`~clipheads.runkey.RunKeyError`, one line naming the change) a CCS checkpoint made with other
    judges or judge settings, before any head is judged; nothing when there is no checkpoint yet."""
    judges = [judges] if isinstance(judges, Judge) else list(judges)
    _load_checkpoint(Path(checkpoint), judges_key(judges, labeler or judges[0]))


def concept_consistency(descriptions: Mapping[str, Sequence[str]], judges: Judge | Sequence[Judge],
                        shape: tuple[int, int], labeler: Judge | None = None,
                        checkpoint: str | os.PathLike | None = None,
                        progress: Callable[[int, int], None] | None = None, meta: dict | None = None) -> CCSResult:
    """Label every head and compute its CCS.

    Args:
        descriptions: ``{"L3.H7": [text, ...]}``, the ``k`` TextSpan texts of each head (same ``k`` for all).
        judges: one judge, or several whose answers are combined by majority vote.
        shape: ``(n_layers, n_heads)`` of the model.
        labeler: the judge that names each head's concept (default: the first judge).
        checkpoint: JSON file updated after every head; heads already in it with the same descriptions are not
            judged again. A checkpoint made with other judges or judge settings (see :func:`judges_key`) raises
            :class:`~clipheads.runkey.RunKeyError` naming what changed.
        progress: called with ``(done, total)`` after each head.
    """
    judges = [judges] if isinstance(judges, Judge) else list(judges)
    if not judges:
        raise JudgeError("concept_consistency needs at least one judge")
    labeler = labeler or judges[0]
    names = [j.name for j in judges]
    if len(set(names)) != len(names):
        raise JudgeError(f"judge names must be distinct to record their votes: {names}")
    ks = {len(texts) for texts in descriptions.values()}
    if len(ks) != 1:
        raise DataError(f"every head needs the same number of descriptions; got {sorted(ks)}")
    path = Path(checkpoint) if checkpoint is not None else None
    key = judges_key(judges, labeler) if path is not None else None
    done = _load_checkpoint(path, key)
    heads: list[HeadConcept] = []
    for i, (label_text, texts) in enumerate(descriptions.items()):
        layer, h = parse_head(label_text)
        previous = done.get(head_label(layer, h))
        if previous is not None and previous.descriptions == list(texts):
            heads.append(previous)
        else:
            label = labeler.label(texts)
            votes = {judge.name: [bool(v) for v in judge.judge(label, texts)] for judge in judges}
            heads.append(HeadConcept(layer, h, label, list(texts), majority(list(votes.values())), votes))
            logger.debug("%s: %s, CCS %d", head_label(layer, h), label, heads[-1].ccs)
            if path is not None:
                write_json_atomic(path, {"format": FORMAT + "-checkpoint", "judges": names, "labeler": labeler.name,
                                         "run_key": key.to_dict(),
                                         "heads": [c.to_dict() for c in heads] + [
                                             c.to_dict() for key, c in done.items()
                                             if key not in {x.head_label for x in heads}]})
        if progress is not None:
            progress(i + 1, len(descriptions))
    return CCSResult(heads, ks.pop(), shape, names, labeler.name, meta or {})
