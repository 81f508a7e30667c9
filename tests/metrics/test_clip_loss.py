"""The one CLIP contrastive loss (open_clip's ClipLoss) gives the numbers of the loss it replaced."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipheads.baselines import contrastive_loss
from clipheads.metrics.retrieval import clip_loss
from clipheads.search import clip_loss as search_clip_loss


def _reference(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """The hand-written loss that search/bp.py and baselines/finetune.py each had before."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_clip_loss_equals_the_former_loss_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(7, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    text = torch.randn(7, 16, generator=generator, dtype=torch.float64)
    ours, = torch.autograd.grad(loss := clip_loss(image, text, 100.0), image)
    theirs, = torch.autograd.grad(reference := _reference(image, text, 100.0), image)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert float(loss) > 0
    assert search_clip_loss is clip_loss and contrastive_loss is clip_loss


def test_matched_features_give_a_low_loss():
    features = torch.eye(4) * 3
    assert float(clip_loss(features, features, 100.0)) < 1e-6
    assert float(clip_loss(features, features.roll(1, 0), 100.0)) > 10
