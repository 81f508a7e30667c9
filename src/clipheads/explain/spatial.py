"""Where heads look and what they write from where: attention maps and the per-token (spatial) decomposition.

* :func:`attention_maps`: each head's attention matrix ``softmax(q k^T * scale)`` (``[N, S, H, T, T]``; row 0 is the
  class token's) for the requested layers only, computed by the library's own code
  (:meth:`~clipheads.models.base.CLIPBackend.attention_weights`: transformers' ``eager_attention_forward``, open_clip's
  ``nn.MultiheadAttention`` with ``need_weights=True``). The layers in front run through the library's own (fused)
  modules, the forward stops after the last requested layer, and nothing is computed for other layers. With
  ``mask=`` the maps are taken with that ablation applied: a layer's maps then show where its heads look given the
  residual stream the ablated layers in front of it produced, and a head ablated in that layer itself (listed in
  :attr:`AttentionMaps.ablated`) shows what its operator did (identity: the identity matrix; cls: every row on the
  class token; zero and mean: zeros; scale: ``alpha`` times its pattern; see
  :meth:`~clipheads.interventions.operators.Operator.mix_attention`), as the model returns them under that ablation.
* :func:`spatial_decomposition`: a head's direct contribution to the image embedding (the term of
  :func:`clipheads.explain.decompose`) split over the tokens it reads from: the class token's output of head ``h``
  is ``sum_j A[0, j] v_j W_O[:, h]^T``, so token ``j`` contributes ``A[0, j] v_j W_O[:, h]^T``, linearised through
  the final layer norm exactly as the head's term is (Gandelsman et al., TextSpan, section on spatial maps). Under
  the ``textspan`` convention the head's share of the layer norm's mean and bias and of the ``out_proj`` bias is
  split equally over the ``T`` tokens as well. The ``T`` token terms of a head sum to its term in
  :func:`~clipheads.explain.decompose` (both conventions, tested). Projected on a text direction they give a heat
  map over the image patches (:meth:`SpatialMaps.project`, :meth:`SpatialMaps.grid`). A tower read by an
  attention-pooling head (SigLIP, no class token) splits a head's term over the tokens where it writes, weighted by
  the pooling probe's attention (as TextSpan's SigLIP code splits the pooling attention's output over tokens).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from clipheads.errors import ClipHeadsError
from clipheads.explain.decomposition import (
    PooledLinearisation,
    _final_stage,
    _layer_scale,
    check_convention,
    layer_token_terms,
    pooled_residual_run,
)
from clipheads.heads import Head, head_label, parse_heads, parse_layers
from clipheads.interventions import HeadMask, ablate
from clipheads.models import CLIPBackend, as_backend


def _qkv(backend: CLIPBackend, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``q, k, v`` (``[B, H, T, d]``) of ``layer`` on the residual ``x [B, T, W]`` and the softmax scale, from the
    library's own modules (transformers: ``layer_norm1`` + ``q/k/v_proj``; open_clip: ``ln_1`` + packed
    ``in_proj``)."""
    shape = (x.shape[0], x.shape[1], backend.n_heads, backend.head_dim)
    if backend.kind == "hf":
        block = backend.model.vision_model.encoder.layers[layer]
        attn = block.self_attn
        h = block.layer_norm1(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        scale = float(attn.scale)
    elif backend.kind == "open_clip":
        block = backend.model.visual.transformer.resblocks[layer]
        h = block.ln_1(x)
        q, k, v = nn.functional.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        scale = backend.head_dim ** -0.5
    else:
        raise ClipHeadsError(f"{backend.name}: attention maps support transformers and open_clip ViTs")
    return (*(t.reshape(shape).transpose(1, 2) for t in (q, k, v)), scale)


def patch_grid(n_tokens: int, prefix: int = 1) -> int:
    """Side of the square patch grid of ``n_tokens`` tokens (``prefix`` of them in front of the patches: 1, the
    class token; 0 for SigLIP); a :class:`ClipHeadsError` if the patches do not form a square."""
    side = math.isqrt(n_tokens - prefix)
    if side * side != n_tokens - prefix:
        raise ClipHeadsError(f"{n_tokens - prefix} patch tokens do not form a square grid")
    return side


@dataclass
class AttentionMaps:
    """Attention matrices of ``N`` images.

    Attributes:
        weights: ``[N, S, H, T, T]`` for the ``S`` layers in ``layers``; ``weights[n, s, h, i, j]`` is how much
            token ``i`` attends to token ``j`` (rows sum to 1; token 0 is the class token).
        layers: the requested layers (0-based, sorted).
        ablated: heads ablated while the maps were taken (``L{layer}.H{head}``), empty without a mask.
        prefix_tokens: tokens in front of the patches (1: the class token; 0: none, SigLIP).
    """

    weights: torch.Tensor
    layers: list[int]
    ablated: list[str]
    prefix_tokens: int = 1

    def cls_row(self, layer: int, head: int) -> torch.Tensor:
        """``[N, g, g]``: the class token's attention to each image patch of head ``head`` of ``layer``; for a
        tower without a class token (SigLIP) the attention each patch receives, averaged over all query tokens."""
        weights = self.weights[:, self.layers.index(layer), head]  # [N, T, T]
        row = weights[:, 0, 1:] if self.prefix_tokens else weights.mean(dim=1)
        side = patch_grid(row.shape[-1], 0)
        return row.reshape(-1, side, side)


@torch.inference_mode()
def attention_maps(model: CLIPBackend | nn.Module, pixels: torch.Tensor, layers: str | int | Iterable[int],
                   mask: HeadMask | None = None, op: str = "identity", **op_args) -> AttentionMaps:
    """Attention matrices of every head of ``layers`` on ``pixels`` ``[N, 3, H, W]``, optionally under an ablation.

    Args:
        model: an unablated backend or library model.
        pixels: preprocessed images.
        layers: the layers to look at (``"10,11"``, ``[3]``); only these compute an attention matrix.
        mask, op, op_args: an ablation applied while the maps are taken (as :func:`clipheads.ablate`).

    Returns:
        :class:`AttentionMaps` with ``weights [N, len(layers), H, T, T]`` (float32, on the CPU); the rows of an
        ablated head are its operator's map (see the module docstring), the rows of every other head sum to 1.
    """
    backend = as_backend(model)
    backend.require_unablated("attention maps")
    chosen = parse_layers(layers, backend.n_layers)
    if not chosen:
        raise ClipHeadsError("attention maps: no layers requested")
    maps: dict[int, torch.Tensor] = {}

    def run() -> None:
        x = backend.embed(pixels.to(backend.device, backend.dtype))
        done = 0
        for layer in chosen:
            x = backend.run_layers(x, done, layer)
            maps[layer] = backend.attention_weights(layer, x).float().cpu()
            x = backend.run_layers(x, layer, layer + 1)
            done = layer + 1

    if mask is not None and mask.n_ablated:
        with ablate(backend, mask, op, **op_args):
            run()
        ablated = mask.ablated
    else:
        run()
        ablated = []
    return AttentionMaps(torch.stack([maps[layer] for layer in chosen], 1), chosen, ablated, backend.prefix_tokens)


@dataclass
class SpatialMaps:
    """Per-token direct contributions of chosen heads to the image embeddings of ``N`` images.

    Attributes:
        terms: ``[N, K, T, D]``: token ``j``'s part of head ``k``'s term (token 0: the class token itself); summed
            over ``T`` it is the head's term of :func:`clipheads.explain.decompose` in the same convention.
        heads: the ``K`` heads, ``L{layer}.H{head}``.
        convention: ``textspan`` or ``centred`` (see :mod:`clipheads.explain.decomposition`).
        prefix_tokens: tokens in front of the patches (1: the class token; 0: none, SigLIP).
    """

    terms: torch.Tensor
    heads: list[str]
    convention: str
    prefix_tokens: int = 1

    def project(self, direction: torch.Tensor) -> torch.Tensor:
        """``[N, K, T]``: each token's contribution along ``direction`` (``[D]``, e.g. a text embedding; it is
        normalised to unit length): positive where the token pushes the embedding towards the text."""
        direction = direction.detach().float().flatten().cpu()
        if direction.shape[0] != self.terms.shape[-1]:
            raise ClipHeadsError(f"a direction of {direction.shape[0]} dimensions for {self.terms.shape[-1]}-"
                                 "dimensional embeddings")
        return self.terms @ (direction / direction.norm().clamp_min(1e-12))

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """``[N, K, T]`` token values (from :meth:`project`) -> ``[N, K, g, g]`` over the image patches (the class
        token's own value, if any, is ``values[..., 0]``)."""
        side = patch_grid(values.shape[-1], self.prefix_tokens)
        return values[..., self.prefix_tokens:].reshape(*values.shape[:-1], side, side)


@torch.inference_mode()
def spatial_decomposition(model: CLIPBackend | nn.Module, pixels: torch.Tensor, heads: str | Iterable[str | Head],
                          convention: str = "textspan") -> SpatialMaps:
    """Split the direct contribution of each of ``heads`` to the embeddings of ``pixels`` over the image tokens.

    Args:
        model: an unablated backend or library model whose image tower pools its class token or with an
            attention-pooling head (SigLIP).
        pixels: ``[N, 3, H, W]`` preprocessed images.
        heads: ``"L10.H3,L11.H0"`` or a list of heads.
        convention: ``textspan`` (default, as published) or ``centred``, as in :func:`clipheads.explain.decompose`.

    Returns:
        :class:`SpatialMaps` with ``terms [N, K, T, D]`` (float32, on the CPU).

    Raises:
        ClipHeadsError: an ablated model, an unknown head or convention, a tower that does not pool its class token.
    """
    check_convention(convention)
    backend = as_backend(model)
    backend.require_unablated("the spatial decomposition")
    chosen = list(dict.fromkeys(parse_heads(heads)))
    if not chosen:
        raise ClipHeadsError("spatial decomposition: no heads given")
    for layer, head in chosen:
        if not (0 <= layer < backend.n_layers and 0 <= head < backend.n_heads):
            raise ClipHeadsError(f"{head_label(layer, head)} is not a head of {backend.name}")
    pool = backend.attention_pool()
    if pool is not None:
        return _pooled_spatial(backend, pool, pixels, chosen, convention)
    if getattr(getattr(backend.model, "visual", None), "pool_type", "tok") == "avg":  # CLIPA: no class-token row
        raise ClipHeadsError(f"{backend.name}: the image tower averages its patch tokens; the spatial decomposition "
                             "reads a class token's attention row or an attention pool")
    norm, projection, projection_bias = _final_stage(backend)
    layers = sorted({layer for layer, _ in chosen})
    d = backend.head_dim
    raw: dict[tuple[int, int], torch.Tensor] = {}  # [N, T, W] per head: A[0, j] v_j W_h^T (times layer scale)
    biases: dict[int, torch.Tensor] = {}
    x = backend.embed(pixels.to(backend.device, backend.dtype))
    done = 0
    for layer in layers:
        x = backend.run_layers(x, done, layer)
        q, k, v, scale = _qkv(backend, layer, x)
        row = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale, dim=-1)[:, :, 0]  # [N,H,T]
        proj = backend.out_proj(layer)
        layer_scale = _layer_scale(backend, layer)
        for lay, head in chosen:
            if lay == layer:
                weight = proj.weight.float()[:, head * d:(head + 1) * d]  # [W, d]
                raw[(lay, head)] = layer_scale(row[:, head, :, None] * (v[:, head].float() @ weight.T))
        biases[layer] = (torch.zeros(proj.weight.shape[0], device=x.device) if proj.bias is None
                         else layer_scale(proj.bias.float()))
        x = backend.run_layers(x, layer, layer + 1)
        done = layer + 1
    residual = backend.run_layers(x, done)[:, 0].float()  # [N, W]

    gamma = norm.weight.float() if norm.weight is not None else torch.ones_like(residual[0])
    beta = norm.bias.float() if norm.bias is not None else torch.zeros_like(residual[0])
    projection = projection.float() if projection is not None else torch.eye(residual.shape[-1],
                                                                             device=residual.device)
    mean = residual.mean(dim=-1, keepdim=True)[:, None]  # [N, 1, 1]
    std = torch.sqrt(residual.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)[:, None]
    n_tokens = next(iter(raw.values())).shape[1]
    terms = []
    for layer, head in chosen:
        values = raw[(layer, head)]  # [N, T, W]
        if convention == "centred":
            terms.append((gamma * (values - values.mean(dim=-1, keepdim=True)) / std) @ projection)
            continue
        # textspan: as decomposition._textspan_terms, with the head's shares split over its T tokens
        share = (2 * backend.n_layers + 1) * backend.n_heads * n_tokens
        extra = projection_bias.float() if projection_bias is not None else torch.zeros_like(projection[0])
        embedded = (gamma * (residual - mean[:, 0]) / std[:, 0] + beta) @ projection + extra
        values = values + biases[layer] / (backend.n_heads * n_tokens)
        post = gamma * (values - mean / share) / std + beta / share
        terms.append((post @ projection + extra / share) / embedded.norm(dim=-1)[:, None, None])
    return SpatialMaps(torch.stack(terms, 1).cpu(), [head_label(*h) for h in chosen], convention)


def _pooled_spatial(backend: CLIPBackend, pool, pixels: torch.Tensor, chosen: list[Head], convention: str
                    ) -> SpatialMaps:
    """:func:`spatial_decomposition` for a tower read by an attention pool (SigLIP): a head's term split over the
    tokens where it writes and the pooling probe reads it (``A_pool[t]`` times the head's output at token ``t``,
    through the frozen pool), as TextSpan's SigLIP code splits the pooling attention's output over tokens; under
    ``textspan`` the head's share of the pooling biases is split equally over the ``T`` tokens."""
    start, layers, residual = pooled_residual_run(backend, pixels)
    n_heads, components = backend.n_heads, 2 * backend.n_layers + 1
    linear = PooledLinearisation(pool, residual, convention)
    terms = []
    for layer, head in chosen:
        head_out, bias, _ = layer_token_terms(backend, layer, *layers[layer])
        values = head_out[:, head]  # [N, T, W]
        if convention == "textspan":
            terms.append(linear(values + bias / n_heads, components * n_heads, per_token=True))
        else:
            terms.append(linear(values, per_token=True))
    return SpatialMaps(torch.stack(terms, 1).cpu(), [head_label(*h) for h in chosen], convention,
                       backend.prefix_tokens)
