"""Activation patching: chosen heads' outputs on a destination image replaced by their outputs on a source image.

For source/destination pairs ``(s_i, d_i)`` (row ``i`` of two batches of the same size), :func:`patch` first runs
the source images once, recording the per-head outputs ``z`` (``[B, T, H, d]``, before ``out_proj``) of the patched
heads only, then installs head hooks (the same sites as the ablation operators: transformers' attention interface,
open_clip's hooked attention) that write those outputs into the destination's forward pass. Only layers with a
patched head get a hook; ``out_proj``'s bias is kept. As with :func:`clipheads.apply`, a patch that is active but
whose hooks did not run makes ``encode_image`` fail.

:func:`patch_effects` asks how much of the embedding change from destination to source each head carries: with
``delta = e(source) - e(destination)`` and ``e_h`` the destination's embedding with head ``h`` patched in,
``explained_h = <e_h - e(destination), delta> / |delta|^2`` (1: the head alone moves the embedding all the way to
the source's along ``delta``; 0: not at all). The same is reported for all chosen heads patched together.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from clipheads.errors import ClipHeadsError
from clipheads.heads import Head, head_label, parse_heads
from clipheads.interventions.mask import HeadMask
from clipheads.models import CLIPBackend, as_backend

FORMAT = "clipheads.Patch/1"


@dataclass
class Patch:
    """An active patch (kept as the model's intervention while :func:`patch` is open)."""

    mask: HeadMask  # gates 0 at the patched heads
    source: dict[int, torch.Tensor]  # layer -> recorded z [B, T, H, d] of the source images
    calls: int = 0  # hook calls so far: lets the backend prove that the patch really ran


def _heads_of(backend: CLIPBackend, heads: str | Iterable[str | Head]) -> list[tuple[int, int]]:
    chosen = sorted(set(parse_heads(heads)))
    if not chosen:
        raise ClipHeadsError("no heads to patch")
    for layer, head in chosen:
        if not (0 <= layer < backend.n_layers and 0 <= head < backend.n_heads):
            raise ClipHeadsError(f"{head_label(layer, head)} is not a head of {backend.name} ({backend.n_layers} "
                                 f"layers x {backend.n_heads} heads)")
    return chosen


@torch.inference_mode()
def record_head_outputs(model: CLIPBackend | nn.Module, pixels: torch.Tensor, layers: Iterable[int]
                        ) -> dict[int, torch.Tensor]:
    """Per-head outputs ``z`` (``[B, T, H, d]``, before ``out_proj``) of ``layers`` on ``pixels`` ``[B, 3, H, W]``.

    The forward pass stops after the last requested layer. Raises :class:`ClipHeadsError` on an ablated model.
    """
    backend = as_backend(model)
    backend.require_unablated("recording head outputs")
    wanted = sorted(set(layers))
    recorded: dict[int, torch.Tensor] = {}

    def recorder(layer: int):
        def hook(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            recorded[layer] = z.detach().clone()
            return z

        return hook

    try:
        for layer in wanted:
            backend.set_head_hook(layer, recorder(layer))
        if wanted:
            backend.run_layers(backend.embed(pixels.to(backend.device, backend.dtype)), 0, wanted[-1] + 1)
    finally:
        backend.clear_head_hooks()
    return recorded


def _patch_hook(layer: int, heads: list[int], state: Patch):
    index = torch.tensor(heads)

    def hook(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state.calls += 1
        source = state.source[layer]
        if source.shape[0] != z.shape[0] or source.shape[1] != z.shape[1]:
            raise ClipHeadsError(f"patch: the source images give {tuple(source.shape[:2])} (images, tokens) at layer "
                                 f"{layer}, the destination {tuple(z.shape[:2])}; use as many images of one size")
        out = z.clone()
        out[:, :, index.to(z.device)] = source[:, :, index].to(z.device, z.dtype)
        return out

    return hook


@contextmanager
def patch(model: CLIPBackend | nn.Module, heads: str | Iterable[str | Head], source: torch.Tensor
          ) -> Iterator[CLIPBackend]:
    """``with clipheads.patch(model, "L3.H7,L5.H1", source_pixels): model.encode_image(destination_pixels)``.

    Args:
        model: an unablated backend or library model.
        heads: the heads to patch (``"L3.H7,L5.H1"``, ``["L3.H7", (5, 1)]``).
        source: ``[B, 3, H, W]`` preprocessed source images; inside the block, images passed to the model (the
            destinations) must be ``B`` images of the same size: row ``i`` receives source ``i``'s head outputs.

    Raises:
        ClipHeadsError: an ablated model, an unknown head, or (inside) destinations that do not match the sources.
    """
    backend = as_backend(model)
    chosen = _heads_of(backend, heads)
    layers = sorted({layer for layer, _ in chosen})
    recorded = record_head_outputs(backend, source, layers)
    state = Patch(HeadMask.from_heads([head_label(*h) for h in chosen], backend), recorded)
    try:
        for layer in layers:
            backend.set_head_hook(layer, _patch_hook(layer, [h for lay, h in chosen if lay == layer], state))
        backend.intervention = state
        yield backend
    finally:
        backend.clear_head_hooks()
        backend.intervention = None


@dataclass
class PatchResult:
    """How much of the embedding change from each destination to its source each patched head explains.

    Attributes:
        heads: the patched heads, ``L{layer}.H{head}``.
        explained: ``[P, K]`` per pair and head: ``<e_h - e_dst, delta> / |delta|^2`` (see the module doc).
        joint: ``[P]`` the same with all heads patched together.
        change: ``[P]`` ``|delta|``, the norm of ``e(source) - e(destination)``.
        pairs: names of the (source, destination) pairs.
    """

    heads: list[str]
    explained: torch.Tensor
    joint: torch.Tensor
    change: torch.Tensor
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def mean_explained(self) -> dict[str, float]:
        return {h: float(self.explained[:, i].mean()) for i, h in enumerate(self.heads)}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "heads": self.heads,
                "mean_explained": self.mean_explained(), "mean_joint": float(self.joint.mean()),
                "pairs": [{"source": s, "destination": d, "change_norm": float(self.change[i]),
                           "joint": float(self.joint[i]),
                           "explained": {h: float(self.explained[i, k]) for k, h in enumerate(self.heads)}}
                          for i, (s, d) in enumerate(self.pairs)]}


@torch.inference_mode()
def patch_effects(model: CLIPBackend | nn.Module, heads: str | Iterable[str | Head], source: torch.Tensor,
                  destination: torch.Tensor, pairs: list[tuple[str, str]] | None = None) -> PatchResult:
    """Patch each head alone, then all together, from ``source`` into ``destination`` (both ``[P, 3, H, W]``).

    Embeddings are unnormalised (``encode_image``). A pair whose source and destination embed identically has
    ``delta = 0``: its fractions are ``nan``.
    """
    backend = as_backend(model)
    chosen = _heads_of(backend, heads)
    if source.shape != destination.shape:
        raise ClipHeadsError(f"patch: {tuple(source.shape)} source pixels and {tuple(destination.shape)} "
                             "destination pixels; pair them one to one (same number, same size)")
    backend.require_unablated("activation patching")
    e_src = backend.encode_image(source).double()
    e_dst = backend.encode_image(destination).double()
    delta = e_src - e_dst
    norm2 = (delta * delta).sum(-1)

    def fraction(embedding: torch.Tensor) -> torch.Tensor:
        return ((embedding.double() - e_dst) * delta).sum(-1) / norm2

    explained = []
    for h in chosen:
        with patch(backend, [h], source):
            explained.append(fraction(backend.encode_image(destination)))
    with patch(backend, chosen, source):
        joint = fraction(backend.encode_image(destination))
    names = pairs or [(f"source {i}", f"destination {i}") for i in range(source.shape[0])]
    return PatchResult([head_label(*h) for h in chosen], torch.stack(explained, 1).float(), joint.float(),
                       norm2.sqrt().float(), names)
