"""What an ablated head's output becomes: the operators, and the soft-gate mix ``g*out + (1-g)*replacement``.

Shapes: ``z`` (the head outputs before ``out_proj``) and ``v`` (the values) are ``[batch, pos, head, d_head]``.

* ``identity`` - the head's attention matrix becomes the identity: each token receives its own value vector
  ("value only", the AAT and layer-wise cancellation works).
* ``cls`` - every token attends only to the class token: each token receives the class token's value.
* ``zero`` - the head's output is zero.
* ``mean`` - the head's output is replaced by its mean over a reference image set (over images and token
  positions, see :func:`clipheads.compute_head_means`), which keeps the operator foldable into weights.
* ``scale`` - the head's output is multiplied by ``alpha`` (soft pruning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipheads.errors import OperatorError

OPERATORS = ("identity", "cls", "zero", "mean", "scale")
BAKEABLE = ("zero", "mean", "scale")


@dataclass(frozen=True)
class Operator:
    """An ablation operator. ``alpha`` is used by ``scale``; ``means`` (``[n_layers, n_heads, d_head]``) by ``mean``."""

    name: str = "identity"
    alpha: float = 0.0
    means: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.name not in OPERATORS:
            raise OperatorError(f"unknown operator {self.name!r}; choose one of {', '.join(OPERATORS)}")
        if self.name == "mean" and self.means is None:
            raise OperatorError("operator 'mean' needs head means: compute them with clipheads.compute_head_means "
                                "and pass means= or store them in the mask (CLI: write the mask with 'clipheads "
                                "mask --means-from FOLDER')")

    def describe(self) -> str:
        return f"scale(alpha={self.alpha:g})" if self.name == "scale" else self.name

    def to_dict(self) -> dict:
        out: dict = {"name": self.name}
        if self.name == "scale":
            out["alpha"] = self.alpha
        return out

    def replacement(self, z: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """What the heads' outputs become when fully ablated, ``[B, T, H, d]``."""
        if self.name == "identity":
            return v
        if self.name == "cls":
            return v[:, :1].expand_as(v)
        if self.name == "zero":
            return torch.zeros_like(z)
        if self.name == "scale":
            return z * self.alpha
        return self.means[layer].to(z.device, z.dtype).expand_as(z)  # mean

    def mix(self, z: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, layer: int) -> torch.Tensor:
        """``g*z + (1-g)*replacement`` per head; exact for ``g`` in {0, 1} and differentiable in ``g``."""
        g = gates.to(z.device, z.dtype).view(1, 1, -1, 1)
        return g * z + (1 - g) * self.replacement(z, v, layer)


def resolve_operator(op: str | Operator = "identity", alpha: float | None = None,
                     means: torch.Tensor | None = None) -> Operator:
    """An :class:`Operator` from a name (plus ``alpha``/``means``) or an existing one."""
    if isinstance(op, Operator):
        if alpha is None and means is None:
            return op
        return Operator(op.name, op.alpha if alpha is None else alpha, op.means if means is None else means)
    return Operator(str(op), 0.0 if alpha is None else float(alpha), means)
