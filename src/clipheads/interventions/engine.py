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
from clipheads.interventions.operators import BAKEABLE, MEAN_KINDS, Operator, resolve_operator
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

    # what the layer's attention maps become (read by the backends when weights are asked for)
    hook.attention = lambda weights: intervention.operator.mix_attention(weights, gates[layer])
    return hook


def apply(model: ModelLike, mask: HeadMask, op: str | Operator = "identity", *, alpha: float | None = None,
          means: torch.Tensor | None = None) -> CLIPBackend:
    """Ablate the heads of ``mask`` until :func:`remove` is called. Returns the model's backend.

    Args:
        model: a backend from :func:`clipheads.load` or a library model (``CLIPModel``, open_clip ``CLIP``).
        mask: gates per head; a ``requires_grad`` gate tensor hooks every layer so that all gates get gradients.
        op: ``identity`` (default), ``cls``, ``zero``, ``mean`` or ``scale``, or an :class:`Operator`.
        alpha: factor for ``scale``. means: for ``mean`` (default: ``mask.means``), ``[n_layers, n_heads, d_head]``
            (pooled) or ``[n_layers, n_heads, pos, d_head]`` (per-position), see :func:`compute_head_means`.
    """
    backend = as_backend(model)
    if backend.intervention is not None:
        raise ClipHeadsError("this model already has an ablation applied; call clipheads.remove(model) first")
    mask.check(backend)
    operator = _operator_for(mask, op, alpha, means).check_fits(backend)
    if operator.means is not None and (tuple(operator.means.shape[:2]) != mask.shape
                                       or operator.means.shape[-1] != backend.head_dim):
        raise OperatorError(f"head means of shape {tuple(operator.means.shape)} do not fit this model "
                            f"({mask.shape[0]}, {mask.shape[1]}, [positions,] {backend.head_dim})")
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
    folded; nor can ``mean`` with per-position means (``out_proj``'s bias is the same at every position): use
    pooled means.
    """
    backend = as_backend(model)
    mask.check(backend)
    operator = _operator_for(mask, op, alpha, means)
    if operator.name not in BAKEABLE:
        raise OperatorError(f"operator {operator.name!r} cannot be folded into weights (only "
                            f"{', '.join(BAKEABLE)}); use clipheads.apply or clipheads.ablate for it")
    if operator.name == "mean" and operator.means.dim() == 4:
        raise OperatorError("per-position head means cannot be folded into out_proj (its bias is the same at every "
                            "token position); bake pooled means (compute_head_means(kind='pooled'), CLI --means "
                            "pooled) or use clipheads.apply / clipheads.ablate")
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


def check_means_kind(kind: str) -> str:
    """``kind`` if it is one of ``per-position``, ``pooled``; else a :class:`ClipHeadsError` in one line."""
    if kind not in MEAN_KINDS:
        raise ClipHeadsError(f"unknown kind of head means {kind!r}; choose one of {', '.join(MEAN_KINDS)}")
    return kind


@torch.inference_mode()
def compute_head_means(model: ModelLike, batches: Iterable[torch.Tensor] | torch.Tensor,
                       kind: str = "per-position") -> torch.Tensor:
    """Mean output ``z`` (before ``out_proj``) of every head over a reference image set.

    Args:
        model: an unablated backend or library model.
        batches: preprocessed pixels ``[B, 3, H, W]`` or an iterable of such batches (all of one image size).
        kind: ``per-position`` (default): the mean over images at each token position, ``[n_layers, n_heads, pos,
            d_head]`` (the usual mean ablation, as in clip_text_span); ``pooled``: over images and token positions,
            ``[n_layers, n_heads, d_head]``, which :func:`bake` folds into ``out_proj``'s bias.

    Raises:
        ClipHeadsError: an unknown ``kind``, an ablated model, no images, or images of different sizes.
    """
    check_means_kind(kind)
    backend = as_backend(model)
    if backend.intervention is not None:
        raise ClipHeadsError("compute head means on the unablated model (call clipheads.remove first)")
    sums: list[torch.Tensor | None] = [None] * backend.n_layers
    counts = [0]

    def recorder(layer: int):
        def hook(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            batch = z.detach().double().sum(dim=0).cpu()  # [T, H, d]
            if kind == "pooled":
                batch = batch.sum(dim=0)
            if sums[layer] is not None and sums[layer].shape != batch.shape:
                raise ClipHeadsError(f"head means: images give {z.shape[1]} token positions here and "
                                     f"{sums[layer].shape[0]} before; use one image size")
            sums[layer] = batch if sums[layer] is None else sums[layer] + batch
            if layer == 0:
                counts[0] += z.shape[0] * (z.shape[1] if kind == "pooled" else 1)
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
    means = torch.stack(sums) / counts[0]  # [L, H, d] or [L, T, H, d]
    return (means if kind == "pooled" else means.permute(0, 2, 1, 3)).float().contiguous()
