"""Attribution scan: every head's ablation effect estimated from one forward and one backward pass.

With a soft gate ``g`` on every head (all at 1) and the chosen operator as the replacement, the first-order change
of a differentiable surrogate ``S`` of the metric when head ``h`` is ablated (``g_h``: 1 -> 0) is
``-dS/dg_h`` (attribution patching). The surrogate is the negated CLIP contrastive loss of the evaluation pairs
against cached text features, so "higher is better" as for the real metric.

The loss over all images is not a sum of per-batch terms (text->image softmaxes run over every image), so the
gradient is taken in two exact steps that keep memory bounded: (1) encode every image once without gradients and
differentiate the loss with respect to the image features; (2) re-encode batch by batch with the gates and
back-propagate those feature gradients (a vector-Jacobian product), accumulating ``dS/dg``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipheads.interventions import HeadMask, ablate
from clipheads.models import CLIPBackend


@dataclass
class AttributionResult:
    """``estimated_delta[l, h]``: first-order change of the surrogate (higher = better) when head ``L{l}.H{h}`` is
    ablated; ``surrogate``: its value on the unablated model."""

    estimated_delta: torch.Tensor
    surrogate: float
    operator: str

    def to_dict(self) -> dict:
        return {"estimated_delta": self.estimated_delta.tolist(), "surrogate": self.surrogate,
                "operator": self.operator}


def contrastive_surrogate(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                          logit_scale: float) -> torch.Tensor:
    """Negated symmetric CLIP loss for ``[N, D]`` images and ``[M, D]`` texts, ``text_to_image [M]``.

    Image->text: each image's log-probability mass on its own captions; text->image: each caption's
    log-probability of its image. Higher is better.
    """
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T  # [N, M]
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[text_to_image, torch.arange(len(text_to_image))] = True
    image_to_text = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1) - logits.logsumexp(dim=1)
    text_to_image_lp = logits.T.log_softmax(dim=1)[torch.arange(len(text_to_image)), text_to_image]
    return (image_to_text.mean() + text_to_image_lp.mean()) / 2


def attribution_scan(
    backend: CLIPBackend,
    pixels: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    op: str = "identity",
    alpha: float | None = None,
    means: torch.Tensor | None = None,
    batch_size: int = 64,
) -> AttributionResult:
    """Estimate the effect of ablating every head from one forward and one backward pass over ``pixels``.

    Args:
        pixels: ``[N, 3, H, W]`` preprocessed evaluation images.
        text_features: ``[M, D]`` cached caption features; ``text_to_image``: ``[M]`` image index of each caption.
        op, alpha, means: the operator whose soft-gate form replaces an ablated head.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=backend.device)
    scale = backend.logit_scale
    with torch.no_grad():
        features = torch.cat([backend.encode_image(pixels[i:i + batch_size])
                              for i in range(0, len(pixels), batch_size)])
    features = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    features.requires_grad_(True)
    text_features = text_features.to(backend.device, features.dtype)
    surrogate = contrastive_surrogate(features, text_features, text_to_image, scale)
    (feature_grad,) = torch.autograd.grad(surrogate, features)

    gates = torch.ones(backend.n_layers, backend.n_heads, device=backend.device, dtype=features.dtype,
                       requires_grad=True)
    frozen = [p for p in backend.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with ablate(backend, HeadMask.from_tensor(gates, backend), op=op, alpha=alpha, means=means):
            for i in range(0, len(pixels), batch_size):
                out = backend.encode_image(pixels[i:i + batch_size])
                out.backward(feature_grad[i:i + batch_size].to(out.dtype))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    # ablating means moving g_h from 1 to 0: first-order change = -dS/dg_h
    return AttributionResult(-gates.grad.detach().cpu(), float(surrogate.detach()), op)
