"""Which heads carry the planted cue: each head's direct share of the embedding change that the cue alone causes.

A counterfactual group renders one scene with every marker colour, so within a group only the cue changes. For the
deviations from the group mean, the image embedding's change ``d_emb`` is the sum of the terms' changes (the
decomposition is additive), so each head's share ``<d_head, d_emb> / |d_emb|^2`` summed over images sums to 1 over all
terms (heads, MLPs, embedding). A head with a large share writes the cue into the embedding directly; effects that a
head passes on through later layers are not counted here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipheads.explain.decomposition import decompose
from clipheads.models import CLIPBackend


def cue_share(backend: CLIPBackend, groups: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Per-head share ``[L, H]`` of the cue-driven embedding change, and the share of all heads together.

    Args:
        groups: one ``[G, 3, H, W]`` tensor per counterfactual group (the same scene with every cue value).
    """
    numerator = torch.zeros(backend.n_layers, backend.n_heads, dtype=torch.float64)
    denominator = 0.0
    for pixels in groups:
        parts = decompose(backend, pixels, convention="centred")  # shares of the unnormalised embedding
        total = parts.total().double()  # [G, D]
        d_emb = total - total.mean(dim=0, keepdim=True)
        heads = parts.heads.double()  # [G, L, H, D]
        d_heads = heads - heads.mean(dim=0, keepdim=True)
        numerator += torch.einsum("glhd,gd->lh", d_heads, d_emb)
        denominator += float((d_emb**2).sum())
    share = (numerator / max(denominator, 1e-12)).float()
    return share, float(share.sum())
