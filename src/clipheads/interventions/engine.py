"""Applying a head mask to a model: ``apply``/``remove``, the ``ablate`` context manager, ``bake`` and head means.

Only layers that contain an ablated head get a hook; every other layer runs the library's module untouched, and an
all-ones mask installs nothing at all. In a hooked layer the fused attention kernel still runs for all heads and
only the outputs of the ablated heads are replaced, so no attention matrix is ever materialised.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from clipheads.errors import ClipHeadsError, OperatorError
from clipheads.interventions.mask import HeadMask
from clipheads.interventions.operators import BAKEABLE, Operator, resolve_operator
from clipheads.models import CLIPBackend, as_backend
from clipheads.models.base import recall_input, remember_inputs

ModelLike = CLIPBackend | nn.Module


@dataclass
class Intervention:
    """What is applied to a model: the mask and the operator."""

    mask: HeadMask
    operator: Operator
    calls: int = 0  # hook calls so far: lets the backend prove that an ablation really ran


def _operator_for(mask: HeadMask, op: str | Operator, alpha: float | None, means: torch.Tensor | None) -> Operator:
    name = op.name if isinstance(op, Operator) else op
    if name == "mean" and means is None and not (isinstance(op, Operator) and op.means is not None):
        means = mask.means
    return resolve_operator(op, alpha=alpha, means=means)


def _make_hook(gates: torch.Tensor, layer: int, intervention: Intervention):
    def hook(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        intervention.calls += 1
        # index at call time so that a learned gate tensor (AAT-BP) is read after every optimiser step
        return intervention.operator.mix(z, v, gates[layer], layer)

    return hook


def apply(model: ModelLike, mask: HeadMask, op: str | Operator = "identity", *, alpha: float | None = None,
          means: torch.Tensor | None = None) -> CLIPBackend:
    """Ablate the heads of ``mask`` until :func:`remove` is called. Returns the model's backend.

    Args:
        model: a backend from :func:`clipheads.load` or a library model (``CLIPModel``, open_clip ``CLIP``).
        mask: gates per head; a ``requires_grad`` gate tensor hooks every layer so that all gates get gradients.
        op: ``identity`` (default), ``cls``, ``zero``, ``mean`` or ``scale``, or an :class:`Operator`.
        alpha: factor for ``scale``. means: ``[n_layers, n_heads, d_head]`` for ``mean`` (default: ``mask.means``).
    """
    backend = as_backend(model)
    if backend.intervention is not None:
        raise ClipHeadsError("this model already has an ablation applied; call clipheads.remove(model) first")
    mask.check(backend)
    operator = _operator_for(mask, op, alpha, means)
    if operator.means is not None and tuple(operator.means.shape) != (*mask.shape, backend.head_dim):
        raise OperatorError(f"head means of shape {tuple(operator.means.shape)} do not fit this model "
                            f"({mask.shape[0]}, {mask.shape[1]}, {backend.head_dim})")
    intervention = Intervention(mask, operator)
    layers = range(backend.n_layers) if mask.gates.requires_grad else mask.layers
    for layer in layers:
        backend.set_head_hook(layer, _make_hook(mask.gates, layer, intervention))
    backend.intervention = intervention
    return backend


def remove(model: ModelLike) -> CLIPBackend:
    """Undo :func:`apply`: every layer runs the library's own module again."""
    backend = as_backend(model)
    backend.clear_head_hooks()
    backend.intervention = None
    return backend


@contextmanager
def ablate(model: ModelLike, mask: HeadMask, op: str | Operator = "identity", *, alpha: float | None = None,
           means: torch.Tensor | None = None) -> Iterator[CLIPBackend]:
    """``with clipheads.ablate(model, mask, op="identity"): ...`` - the model is restored on exit, also on errors."""
    backend = apply(model, mask, op, alpha=alpha, means=means)
    try:
        yield backend
    finally:
        remove(backend)


def bake(model: ModelLike, mask: HeadMask, op: str | Operator = "zero", *, alpha: float | None = None,
         means: torch.Tensor | None = None, inplace: bool = False) -> nn.Module:
    """Fold a ``zero``/``mean``/``scale`` ablation into the output projections; returns a plain library model.

    The result is a ``transformers``/``open_clip`` model with no hooks and zero overhead. It keeps the tokenizer,
    image processor and open_clip config of ``model``: ``clipheads.save(baked, folder)`` writes all of them, and
    ``clipheads.load(folder)`` reads it back. ``identity`` and ``cls`` depend on each token's values and cannot be
    folded.
    """
    backend = as_backend(model)
    mask.check(backend)
    operator = _operator_for(mask, op, alpha, means)
    if operator.name not in BAKEABLE:
        raise OperatorError(f"operator {operator.name!r} cannot be folded into weights (only "
                            f"{', '.join(BAKEABLE)}); use clipheads.apply or clipheads.ablate for it")
    target = backend.model if inplace else copy.deepcopy(backend.model)
    baked = as_backend(target)
    baked.clear_head_hooks()
    baked.intervention = None
    previous = recall_input(backend.model, "baked") or []  # a model baked before keeps that history
    remember_inputs(target, baked=[*previous, {"model": backend.name, "operator": operator.to_dict(),
                                               "ablated": mask.ablated}])
    d = baked.head_dim
    gates = mask.gates.detach()
    with torch.no_grad():
        for layer in mask.layers:
            proj = baked.out_proj(layer)
            for head in (gates[layer] != 1).nonzero().flatten().tolist():
                cols = slice(head * d, (head + 1) * d)
                g = float(gates[layer, head])
                if operator.name == "mean":
                    if proj.bias is None:
                        raise OperatorError(f"layer {layer}'s out_proj has no bias to fold head means into")
                    mean = operator.means[layer, head].to(proj.weight.device, proj.weight.dtype)
                    proj.bias += (1 - g) * (proj.weight[:, cols] @ mean)
                factor = g + (1 - g) * operator.alpha if operator.name == "scale" else g
                proj.weight[:, cols] *= factor
    return target


@torch.inference_mode()
def compute_head_means(model: ModelLike, batches: Iterable[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Mean output of every head over a reference image set: ``[n_layers, n_heads, d_head]``.

    The mean runs over images and token positions, so that the ``mean`` operator can be folded into weights.
    ``batches``: preprocessed pixels ``[B, 3, H, W]`` or an iterable of such batches.
    """
    backend = as_backend(model)
    if backend.intervention is not None:
        raise ClipHeadsError("compute head means on the unablated model (call clipheads.remove first)")
    sums = torch.zeros(backend.n_layers, backend.n_heads, backend.head_dim, dtype=torch.float64)
    counts = [0]

    def recorder(layer: int):
        def hook(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            sums[layer] += z.detach().double().sum(dim=(0, 1)).cpu()
            if layer == 0:
                counts[0] += z.shape[0] * z.shape[1]
            return z

        return hook

    if isinstance(batches, torch.Tensor):
        batches = [batches]
    try:
        for layer in range(backend.n_layers):
            backend.set_head_hook(layer, recorder(layer))
        for pixels in batches:
            backend.encode_image(pixels)
    finally:
        backend.clear_head_hooks()
    if counts[0] == 0:
        raise ClipHeadsError("compute_head_means got no images")
    return (sums / counts[0]).float()
