"""Attribution scan: every head's ablation effect estimated from one forward and one backward pass.

With a soft gate ``g`` on every head (all at 1) and the chosen operator as the replacement, the first-order change
of a differentiable surrogate ``S`` of the metric when head ``h`` is ablated (``g_h``: 1 -> 0) is
``-dS/dg_h`` (attribution patching). Two surrogates of the retrieval metric, both "higher is better":

* ``soft_recall`` (default): mean recall at 1, 5 and 10 in both directions, with each rank counted by sigmoids of
  similarity differences and each "rank < K" test a sigmoid in rank units: the metric itself, made smooth;
* ``contrastive``: the negated CLIP contrastive loss of the evaluation pairs against the cached text features.

The loss over all images is not a sum of per-batch terms (text->image softmaxes run over every image), so the
gradient is taken in two exact steps that keep memory bounded: (1) encode every image once without gradients and
differentiate the loss with respect to the image features; (2) re-encode batch by batch with the gates and
back-propagate those feature gradients (a vector-Jacobian product), accumulating ``dS/dg``. When every image fits in
one batch (and no features are given), step (1) is skipped: the surrogate is differentiated through the gated
forward directly, one forward pass less.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipheads.errors import ClipHeadsError
from clipheads.interventions import HeadMask, ablate
from clipheads.models import CLIPBackend
from clipheads.models.base import frozen_parameters
from clipheads.search.scan import ScanResult

# Chosen on the bundled model's world drawn with another seed (seed 1, 1000 val_ood images, not the benchmark's): the
# grid similarity 0.02..0.07 x rank 2..16 gave Spearman 0.55..0.79 against the exact scan, flat around these values.
SIMILARITY_TEMPERATURE = 0.03
RANK_TEMPERATURE = 8.0


@dataclass
class AttributionResult:
    """``estimated_delta[l, h]``: first-order change of the surrogate (higher = better) when head ``L{l}.H{h}`` is
    ablated; ``surrogate``: its value on the unablated model."""

    estimated_delta: torch.Tensor
    surrogate: float
    operator: str
    surrogate_name: str = "soft_recall"

    def to_dict(self) -> dict:
        return {"estimated_delta": self.estimated_delta.tolist(), "surrogate": self.surrogate,
                "surrogate_name": self.surrogate_name, "operator": self.operator}

    def as_scan(self, split: str = "") -> ScanResult:
        """The estimate as a :class:`ScanResult` (scores = surrogate + estimated change), so that everything that
        takes a scan (GA seeding, greedy candidates, top-k masks) can take the estimate instead."""
        return ScanResult(self.surrogate, self.surrogate + self.estimated_delta,
                          f"{self.surrogate_name} (first-order estimate)", self.operator, split)


def contrastive_surrogate(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                          logit_scale: float) -> torch.Tensor:
    """Negated symmetric CLIP loss for ``[N, D]`` images and ``[M, D]`` texts, ``text_to_image [M]``.

    Image->text: each image's log-probability mass on its own captions; text->image: each caption's
    log-probability of its image. Higher is better.
    """
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T  # [N, M]
    texts = torch.arange(len(text_to_image), device=logits.device)
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[text_to_image, texts] = True
    image_to_text = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1) - logits.logsumexp(dim=1)
    text_to_image_lp = logits.T.log_softmax(dim=1)[texts, text_to_image]
    return (image_to_text.mean() + text_to_image_lp.mean()) / 2


def soft_recall_surrogate(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                          logit_scale: float = 0.0, similarity_temperature: float = SIMILARITY_TEMPERATURE,
                          rank_temperature: float = RANK_TEMPERATURE, ks: Sequence[int] = (1, 5, 10)) -> torch.Tensor:
    """Smooth mean recall@``ks`` of ``[N, D]`` images and ``[M, D]`` texts (``text_to_image [M]``).

    The rank of a positive is the number of negatives scoring above it; here each "above" is
    ``sigmoid((s_neg - s_pos) / similarity_temperature)`` and each recall@K test ``rank < K`` is
    ``sigmoid((K - 1/2 - rank) / rank_temperature)``. Image->text uses each image's best caption, as recall@K
    counts an image found when any of its captions is. ``logit_scale`` is unused (same signature as
    :func:`contrastive_surrogate`).
    """
    sim = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T  # [N, M]
    texts = torch.arange(len(text_to_image), device=sim.device)
    own = torch.zeros_like(sim, dtype=torch.bool)
    own[text_to_image, texts] = True
    positive_t2i = sim[text_to_image, texts]  # [M]: each caption with its image
    above_t2i = torch.sigmoid((sim.T - positive_t2i[:, None]) / similarity_temperature)  # [M, N]
    rank_t2i = above_t2i.masked_fill(own.T, 0).sum(dim=1)
    positive_i2t = sim.masked_fill(~own, float("-inf")).amax(dim=1)  # [N]: each image's best caption
    above_i2t = torch.sigmoid((sim - positive_i2t[:, None]) / similarity_temperature)
    rank_i2t = above_i2t.masked_fill(own, 0).sum(dim=1)
    recalls = [torch.sigmoid((k - 0.5 - rank) / rank_temperature).mean()
               for k in ks for rank in (rank_t2i, rank_i2t)]
    return torch.stack(recalls).mean()


SURROGATES = {"soft_recall": soft_recall_surrogate, "contrastive": contrastive_surrogate}


def attribution_scan(
    backend: CLIPBackend,
    pixels: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    op: str = "identity",
    alpha: float | None = None,
    means: torch.Tensor | None = None,
    batch_size: int = 64,
    surrogate: str = "soft_recall",
    image_features: torch.Tensor | None = None,
) -> AttributionResult:
    """Estimate the effect of ablating every head from one forward and one backward pass over ``pixels``.

    Args:
        pixels: ``[N, 3, H, W]`` preprocessed evaluation images.
        text_features: ``[M, D]`` cached caption features; ``text_to_image``: ``[M]`` image index of each caption.
        op, alpha, means: the operator whose soft-gate form replaces an ablated head.
        surrogate: ``soft_recall`` (smooth mean recall, default) or ``contrastive`` (negated CLIP loss).
        image_features: the unablated model's ``[N, D]`` features of ``pixels`` when they are at hand (e.g. a
            :class:`~clipheads.search.MaskEvaluator`'s ``baseline_features``): saves the first of the two passes.
    """
    if surrogate not in SURROGATES:
        raise ClipHeadsError(f"unknown surrogate {surrogate!r}; choose one of {', '.join(SURROGATES)}")
    if image_features is not None and len(image_features) != len(pixels):
        raise ClipHeadsError(f"{len(image_features)} image features for {len(pixels)} images")
    score = SURROGATES[surrogate]
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=backend.device)
    dtype = torch.float32 if backend.dtype in (torch.float16, torch.bfloat16) else backend.dtype  # the surrogate's
    text_features = text_features.to(backend.device, dtype)
    scale = backend.logit_scale
    one_pass = image_features is None and len(pixels) <= batch_size
    if not one_pass:
        with torch.no_grad():
            features = image_features.detach().to(backend.device) if image_features is not None else torch.cat(
                [backend.encode_image(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
        features = features.to(dtype).requires_grad_(True)
        value = score(features, text_features, text_to_image, scale)
        (feature_grad,) = torch.autograd.grad(value, features)

    gates = torch.ones(backend.n_layers, backend.n_heads, device=backend.device, dtype=dtype, requires_grad=True)
    mask = HeadMask.from_tensor(gates, backend)
    with frozen_parameters(backend.model), ablate(backend, mask, op=op, alpha=alpha, means=means):
        if one_pass:  # every image in one batch: differentiate the surrogate through the gated forward directly
            value = score(backend.encode_image(pixels).to(dtype), text_features, text_to_image, scale)
            value.backward()
        else:
            for i in range(0, len(pixels), batch_size):
                out = backend.encode_image(pixels[i:i + batch_size])
                out.backward(feature_grad[i:i + batch_size].to(out.dtype))
    # ablating means moving g_h from 1 to 0: first-order change = -dS/dg_h
    return AttributionResult(-gates.grad.detach().cpu(), float(value.detach()), op, surrogate)

