"""``HeadMask``: one gate per (layer, head) of the image encoder. 1 = keep, 0 = ablate, in between = soft."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, ValidationError

from clipheads.errors import MaskError
from clipheads.files import write_json_atomic
from clipheads.heads import Head, head_label, parse_head, parse_heads, parse_layers
from clipheads.models.base import Architecture, CLIPBackend

FORMAT = "clipheads.HeadMask/1"

ShapeLike = CLIPBackend | Architecture | tuple[int, int]

FiniteFloat = Annotated[float, AllowInfNan(False)]
Gate = Annotated[float, AllowInfNan(False), Field(ge=0, le=1)]


class MaskArchitecture(BaseModel):
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    width: int = Field(ge=1)
    name: str = ""


class MaskFile(BaseModel):
    """The fields of a mask JSON file (``format`` ``clipheads.HeadMask/1``), as :meth:`HeadMask.from_dict` reads
    them: gates in [0, 1], finite means, an architecture object; other keys (``ablated`` next to ``gates``) are
    allowed."""

    model_config = ConfigDict(extra="allow")

    format: str | None = None
    n_layers: int | None = Field(default=None, ge=1)
    n_heads: int | None = Field(default=None, ge=1)
    architecture: MaskArchitecture | None = None
    gates: list[list[Gate]] | None = None
    ablated: list[str] | None = None
    means: dict[str, list[FiniteFloat] | list[list[FiniteFloat]]] | None = None  # pooled | per-position
    meta: dict = Field(default_factory=dict)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _shape_of(target: ShapeLike) -> tuple[tuple[int, int], Architecture | None]:
    if isinstance(target, CLIPBackend):
        target = target.architecture
    if isinstance(target, Architecture):
        return (target.n_layers, target.n_heads), target
    n_layers, n_heads = (int(v) for v in target)
    return (n_layers, n_heads), None


@dataclass
class HeadMask:
    """Gates ``[n_layers, n_heads]`` for the heads of an image encoder, plus what the mask belongs to.

    ``means`` (optional, ``[n_layers, n_heads, head_dim]`` pooled or ``[n_layers, n_heads, pos, head_dim]``
    per-position) holds the per-head mean outputs used by the ``mean`` operator; it is saved with the mask for the
    heads the mask ablates, with its kind (``means_kind``).
    """

    gates: torch.Tensor
    architecture: Architecture | None = None
    means: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.gates, torch.Tensor):
            self.gates = torch.as_tensor(self.gates, dtype=torch.float32)
        if self.gates.dim() != 2:
            raise MaskError(f"a head mask is [n_layers, n_heads]; got a tensor of shape {tuple(self.gates.shape)}")
        if not self.gates.is_floating_point():
            self.gates = self.gates.float()
        a = self.architecture
        if a is not None and tuple(self.gates.shape) != (a.n_layers, a.n_heads):
            raise MaskError(f"gates of shape {tuple(self.gates.shape)} do not fit {a.n_layers} layers x "
                            f"{a.n_heads} heads")

    # ------------------------------------------------------------ builders
    @classmethod
    def ones(cls, target: ShapeLike) -> HeadMask:
        """Keep every head."""
        shape, arch = _shape_of(target)
        return cls(torch.ones(shape), arch)

    @classmethod
    def from_heads(cls, heads: str | Iterable[str | Head], target: ShapeLike, value: float = 0.0) -> HeadMask:
        """Ablate the given heads (``"L3.H7,L5.H1"`` or ``["L3.H7", (5, 1)]``), keep all others."""
        mask = cls.ones(target)
        for layer, head in parse_heads(heads):
            mask._check_head(layer, head)
            mask.gates[layer, head] = value
        return mask

    @classmethod
    def from_layers(cls, layers: str | int | Iterable[int], target: ShapeLike, value: float = 0.0) -> HeadMask:
        """Ablate every head of the given layers (``3``, ``"0-2,5"``, ``[0, 1]``)."""
        mask = cls.ones(target)
        for layer in parse_layers(layers, mask.shape[0]):
            mask.gates[layer, :] = value
        return mask

    @classmethod
    def from_tensor(cls, gates: torch.Tensor, target: ShapeLike | None = None) -> HeadMask:
        """Wrap a ``[n_layers, n_heads]`` tensor (kept as is: a ``requires_grad`` tensor stays differentiable).

        Raises:
            MaskError: a gate is nan or infinite, or the shape does not fit ``target``.
        """
        if isinstance(gates, torch.Tensor) and not bool(torch.isfinite(gates.detach()).all()):
            raise MaskError("gates must be finite; got nan or inf in the gate tensor")
        arch = None
        if target is not None:
            shape, arch = _shape_of(target)
            if tuple(gates.shape) != shape:
                raise MaskError(f"gates of shape {tuple(gates.shape)} do not fit {shape[0]} layers x {shape[1]} heads")
        return cls(gates, arch)

    # ------------------------------------------------------------- queries
    @property
    def shape(self) -> tuple[int, int]:
        return int(self.gates.shape[0]), int(self.gates.shape[1])

    @property
    def ablated(self) -> list[str]:
        """Labels of the heads whose gate is not 1 (ablated or soft-gated), in layer-head order."""
        return [head_label(int(l_), int(h)) for l_, h in (self.gates.detach() != 1).nonzero().tolist()]

    @property
    def n_ablated(self) -> int:
        return int((self.gates.detach() != 1).sum())

    @property
    def layers(self) -> list[int]:
        """Layers that contain at least one ablated head."""
        return sorted({int(v) for v in (self.gates.detach() != 1).any(dim=1).nonzero().flatten().tolist()})

    def is_identity(self) -> bool:
        return bool((self.gates.detach() == 1).all()) and not self.gates.requires_grad

    def heads_per_layer(self) -> list[int]:
        return (self.gates.detach() != 1).sum(dim=1).tolist()

    def _check_head(self, layer: int, head: int) -> None:
        n_layers, n_heads = self.shape
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise MaskError(f"head {head_label(layer, head)} does not exist in a model with {n_layers} layers x "
                            f"{n_heads} heads (heads are 0-based)")

    def check(self, model: CLIPBackend | Architecture) -> None:
        """Refuse a mask that does not fit ``model`` with one clear line."""
        arch = model.architecture if isinstance(model, CLIPBackend) else model
        if self.shape != (arch.n_layers, arch.n_heads):
            made_for = f" (made for {self.architecture.name or 'another model'})" if self.architecture else ""
            raise MaskError(f"mask of shape {self.shape[0]} layers x {self.shape[1]} heads{made_for} does not fit "
                            f"this model's {arch.n_layers} layers x {arch.n_heads} heads")
        if self.means is not None and self.means.shape[-1] != arch.head_dim:
            raise MaskError(f"mask head means have dim {self.means.shape[-1]}, the model's heads have "
                            f"{arch.head_dim}")

    def __contains__(self, head: str | Head) -> bool:
        layer, h = parse_head(head)
        return bool(self.gates[layer, h] != 1)

    def key(self) -> bytes:
        """A hashable key of the gate values (for memoising evaluations)."""
        return self.gates.detach().to(torch.float32).cpu().numpy().tobytes()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeadMask) and self.shape == other.shape and torch.equal(
            self.gates.detach().cpu(), other.gates.detach().cpu())

    def __repr__(self) -> str:
        heads = self.ablated
        shown = ", ".join(heads[:8]) + (", ..." if len(heads) > 8 else "")
        return f"HeadMask({self.shape[0]}x{self.shape[1]}, ablated={len(heads)}: [{shown}])"

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        gates = self.gates.detach().cpu().tolist()
        data: dict = {"format": FORMAT, "n_layers": self.shape[0], "n_heads": self.shape[1],
                      "architecture": self.architecture.to_dict() if self.architecture else None,
                      "ablated": self.ablated, "gates": gates}
        if self.means is not None:
            data["means"] = {head_label(*parse_head(label)): self.means[parse_head(label)].detach().cpu().tolist()
                             for label in self.ablated}
            data["means_kind"] = "per-position" if self.means.dim() == 4 else "pooled"
        if self.meta:
            data["meta"] = self.meta
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "mask") -> HeadMask:
        """Build a mask from its JSON form (:meth:`to_dict`); every field is checked against :class:`MaskFile`.

        Raises:
            MaskError: one line naming ``source`` and the first field that is missing, of the wrong type, outside
                [0, 1] (gates) or not finite (gates, means).
        """
        if not isinstance(data, dict) or ("gates" not in data and "ablated" not in data):
            raise MaskError(f"{source}: not a clipheads head mask (expected 'gates' or 'ablated')")
        try:
            fields = MaskFile.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            # a union's member ('list[float]') is not a place in the file
            where = ".".join(str(part) for part in error["loc"] if not (isinstance(part, str) and "[" in part))
            where = where or "mask"
            raise MaskError(f"{source}: malformed {where!r} ({error['msg']}, got {_short(error.get('input'))})"
                            ) from None
        arch = Architecture(**fields.architecture.model_dump()) if fields.architecture is not None else None
        try:
            if fields.gates is not None:
                gates = torch.tensor(fields.gates, dtype=torch.float32)
            else:
                if fields.n_layers is None or fields.n_heads is None:
                    raise ValueError("'ablated' needs 'n_layers' and 'n_heads'")
                gates = torch.ones(fields.n_layers, fields.n_heads)
                for layer, head in parse_heads(fields.ablated):
                    gates[layer, head] = 0.0
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise MaskError(f"{source}: malformed gates ({exc})") from None
        if gates.dim() != 2 or not torch.isfinite(gates).all():
            raise MaskError(f"{source}: gates must be a finite [n_layers][n_heads] table")
        means = None
        if fields.means:
            try:
                values = {parse_head(label): torch.tensor(v, dtype=torch.float32) for label, v in fields.means.items()}
            except (TypeError, ValueError) as exc:
                raise MaskError(f"{source}: malformed head means ({exc})") from None
            shape = next(iter(values.values())).shape
            kind = data.get("means_kind", "pooled")  # files before per-position means held pooled ones
            shapes = sorted({tuple(v.shape) for v in values.values()})
            if len(shapes) > 1:
                raise MaskError(f"{source}: head means of different lengths/shapes ({', '.join(map(str, shapes))})")
            if len(shape) != (2 if kind == "per-position" else 1):
                raise MaskError(f"{source}: head means of shape {tuple(shape)} do not match their kind {kind!r}")
            means = torch.zeros(*gates.shape, *shape)
            for (layer, head), value in values.items():
                if not (0 <= layer < gates.shape[0] and 0 <= head < gates.shape[1]):
                    raise MaskError(f"{source}: means of L{layer}.H{head}, which is not a head of this "
                                    f"{gates.shape[0]} x {gates.shape[1]} mask")
                means[layer, head] = value
        return cls(gates, arch, means=means, meta=fields.meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask as JSON, atomically (a crash never leaves a half-written file)."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: CLIPBackend | Architecture | None = None) -> HeadMask:
        """Read a mask written by :meth:`save` (or ``clipheads mask``/``search``).

        Args:
            path: the JSON file.
            model: if given (a backend or an :class:`Architecture`), the mask is checked against it.

        Raises:
            MaskError: the file is missing or not a mask, or the mask does not fit ``model``.
        """
        path = Path(path)
        if not path.is_file():
            raise MaskError(f"mask file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MaskError(f"mask file {str(path)!r} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
                            ) from None
        mask = cls.from_dict(data, source=str(path))
        if model is not None:
            try:
                mask.check(model)
            except MaskError as exc:
                raise MaskError(f"{path}: {exc}") from None
        return mask
