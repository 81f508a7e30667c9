"""What an ablated head's output becomes: the operators, and the soft-gate mix ``g*out + (1-g)*replacement``.

Shapes: ``z`` (the head outputs before ``out_proj``) and ``v`` (the values) are ``[batch, pos, head, d_head]``.

* ``identity`` - the head's attention matrix becomes the identity: each token receives its own value vector
  ("value only", the AAT and layer-wise cancellation works).
* ``cls`` - every token attends only to the class token: each token receives the class token's value.
* ``zero`` - the head's output is zero.
* ``mean`` - the head's output is replaced by its mean over a reference image set (see
  :func:`clipheads.compute_head_means`): ``per-position`` means (``[n_layers, n_heads, pos, d_head]``, the default:
  the mean over images at each token position, the usual definition and clip_text_span's) or ``pooled`` means
  (``[n_layers, n_heads, d_head]``: over images and positions, which :func:`clipheads.bake` can fold into
  ``out_proj``'s bias).
* ``scale`` - the head's output is multiplied by ``alpha`` (soft pruning).

Attention maps under an ablation (:meth:`Operator.mix_attention`) show what the operator did, as the matrix ``A'``
with ``z' = A' v + c`` (``c = 0`` except for ``mean``): ``identity`` -> the identity matrix (each token reads its own
value), ``cls`` -> every row one-hot on the class token, ``zero`` -> all zeros, ``mean`` -> all zeros (the output is
the reference mean ``c``, a constant that reads no token of the image), ``scale`` -> ``alpha`` times the computed
weights (rows sum to ``alpha``). A soft gate ``g`` mixes them as it mixes the outputs: ``g*A + (1-g)*A_op``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipheads.errors import OperatorError

OPERATORS = ("identity", "cls", "zero", "mean", "scale")
BAKEABLE = ("zero", "mean", "scale")
MEAN_KINDS = ("per-position", "pooled")


def means_kind(means: torch.Tensor) -> str:
    """``per-position`` for ``[n_layers, n_heads, pos, d_head]`` head means, ``pooled`` for ``[n_layers, n_heads,
    d_head]``; else an :class:`OperatorError`."""
    if means.dim() == 4:
        return "per-position"
    if means.dim() == 3:
        return "pooled"
    raise OperatorError(f"head means are [n_layers, n_heads, d_head] (pooled) or [n_layers, n_heads, pos, d_head] "
                        f"(per-position); got shape {tuple(means.shape)}")


@dataclass(frozen=True)
class Operator:
    """An ablation operator. ``alpha`` is used by ``scale``; ``means`` by ``mean``: ``[n_layers, n_heads, d_head]``
    (pooled) or ``[n_layers, n_heads, pos, d_head]`` (per-position)."""

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
        if self.means is not None:
            means_kind(self.means)

    def describe(self) -> str:
        return f"scale(alpha={self.alpha:g})" if self.name == "scale" else self.name

    def to_dict(self) -> dict:
        out: dict = {"name": self.name}
        if self.name == "scale":
            out["alpha"] = self.alpha
        return out

    def check_fits(self, backend) -> Operator:
        """``self``, or an :class:`OperatorError` (one line) when the model has nothing the operator needs: ``cls``
        on a tower without a class token (``backend.has_class_token`` False: transformers' and timm's SigLIP, timm
        trunks built with ``class_token=False`` such as ViTamin; token 0 is then an image patch or a register)."""
        if self.name == "cls" and not getattr(backend, "has_class_token", True):
            raise OperatorError(f"operator 'cls' needs a class token, but {backend.name} has none (token 0 is not a "
                                "class token); use identity, zero, mean or scale")
        return self

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
        means = self.means[layer].to(z.device, z.dtype)
        if means.dim() == 3:  # per-position: [H, T, d]
            if means.shape[1] != z.shape[1]:
                raise OperatorError(f"per-position head means have {means.shape[1]} token positions, the images "
                                    f"give {z.shape[1]}: compute the means at this image size")
            means = means.transpose(0, 1)
        return means.expand_as(z)  # mean

    def attention_replacement(self, weights: torch.Tensor) -> torch.Tensor:
        """What the attention weights ``[..., H, Tq, T]`` of fully ablated heads become (see the module docstring):
        the matrix ``A'`` with ``z' = A' v + c``; square ``Tq == T`` weights for ``identity``."""
        if self.name == "identity":
            eye = torch.eye(weights.shape[-2], weights.shape[-1], device=weights.device, dtype=weights.dtype)
            return eye.expand_as(weights)
        if self.name == "cls":
            one_hot = torch.zeros(weights.shape[-1], device=weights.device, dtype=weights.dtype)
            one_hot[0] = 1
            return one_hot.expand_as(weights)
        if self.name == "scale":
            return weights * self.alpha
        return torch.zeros_like(weights)  # zero, mean

    def mix_attention(self, weights: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``g*A + (1-g)*A_op`` per head for attention weights ``[B, H, Tq, T]`` (``[H, Tq, T]`` unbatched): the maps
        the heads have under this ablation; heads with ``g == 1`` keep their weights bit for bit."""
        g = gates.to(weights.device, weights.dtype).view(-1, 1, 1)
        return g * weights + (1 - g) * self.attention_replacement(weights)

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
