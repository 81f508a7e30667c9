"""The head vocabulary: heads are written ``L{layer}.H{head}``, 0-based, everywhere.

The parser also accepts ``L3H7``, ``3.7``, ``3:7`` and ``(3, 7)`` so that masks written by hand or by other
tools can be read, but everything clipheads writes uses ``L3.H7``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from clipheads.errors import MaskError

Head = tuple[int, int]

_HEAD_RE = re.compile(r"^\s*\(?\s*L?(\d+)\s*(?:\.|:|,|\s)?\s*H?(\d+)\s*\)?\s*$", re.IGNORECASE)


def head_label(layer: int, head: int) -> str:
    """``(3, 7) -> "L3.H7"``."""
    return f"L{layer}.H{head}"


def parse_head(spec: str | Head | Iterable[int]) -> Head:
    """Parse one head: ``"L3.H7"``, ``"L3H7"``, ``"3.7"`` or ``(3, 7)`` -> ``(3, 7)``."""
    if isinstance(spec, str):
        match = _HEAD_RE.match(spec)
        if match is None or not (spec.strip().upper().startswith("L") or "." in spec or ":" in spec):
            raise MaskError(f"cannot parse head {spec!r}: write heads as L{{layer}}.H{{head}}, 0-based, e.g. L3.H7")
        return int(match.group(1)), int(match.group(2))
    values = tuple(int(v) for v in spec)
    if len(values) != 2:
        raise MaskError(f"cannot parse head {spec!r}: expected (layer, head)")
    return values[0], values[1]


def parse_heads(specs: str | Iterable[str | Head]) -> list[Head]:
    """Parse a comma/space separated string or an iterable of head specs, keeping order, dropping repeats."""
    if isinstance(specs, str):
        items: Iterable[str | Head] = [s for s in re.split(r"[,\s;]+", specs.strip()) if s]
    else:
        items = specs
    out: list[Head] = []
    for item in items:
        head = parse_head(item)
        if head not in out:
            out.append(head)
    return out


def parse_layers(spec: str | int | Iterable[int], n_layers: int | None = None) -> list[int]:
    """Parse layers: ``"3"``, ``"0-2,5"``, ``[0, 1]`` -> sorted unique list of ints (ranges are inclusive).

    With ``n_layers``, a layer past the model's last one is refused with one line.
    """
    if isinstance(spec, int):
        layers = {spec}
    elif not isinstance(spec, str):
        layers = {int(v) for v in spec}
    else:
        layers = _parse_layer_string(spec)
    if n_layers is not None and any(not 0 <= layer < n_layers for layer in layers):
        raise MaskError(f"layers {spec!r} go past the last layer: the model has {n_layers} layers, 0..{n_layers - 1}")
    return sorted(layers)


def _parse_layer_string(spec: str) -> set[int]:
    layers: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"L?(\d+)\s*(?:-\s*L?(\d+))?", part, re.IGNORECASE)
        if match is None:
            raise MaskError(f"cannot parse layer spec {part!r}: use e.g. 3, 0-2 or 0-2,5")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise MaskError(f"layer range {part!r} is empty (end before start)")
        layers.update(range(lo, hi + 1))
    if not layers:
        raise MaskError(f"layer spec {spec!r} names no layer")
    return layers


def parse_layer_ranges(spec: str, n_layers: int | None = None) -> list[list[int]]:
    """``"0-2,3-5"`` -> ``[[0, 1, 2], [3, 4, 5]]``: one group of layers per comma-separated item (checked against
    ``n_layers`` when given)."""
    return [parse_layers(part.strip(), n_layers) for part in spec.split(",") if part.strip()]


def layer_group_label(layers: Sequence[int]) -> str:
    """``[]`` -> ``"none"``, ``[3]`` -> ``"3"``, ``[0, 1, 2]`` -> ``"0-2"``, ``[0, 5]`` -> ``"0,5"``."""
    layers = sorted(int(layer) for layer in layers)
    if not layers:
        return "none"
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(layer) for layer in layers)
