"""Shared fixtures of the captioner tests: six toy captions, six images a random CLIP tells apart, and a captioner
trained to overfit them."""

from __future__ import annotations

import pytest
import torch

from clipheads.captions import CaptionTrainConfig, build_captioner, encode_images, train_captioner
from clipheads.models.random_init import tiny_model

TOY_CAPTIONS = ["a red circle on the left", "a blue square on the right", "two green trees", "a black cat on a sink",
                "a white dog in a house", "a yellow car"]


@pytest.fixture(scope="session")
def captions() -> list[str]:
    return list(TOY_CAPTIONS)


@pytest.fixture(scope="session")
def clip():
    return tiny_model("hf", seed=0)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """``[6, 3, 32, 32]``: a different flat colour per image plus noise (a random CLIP tells them apart)."""
    generator = torch.Generator().manual_seed(3)
    colours = torch.rand(len(TOY_CAPTIONS), 3, 1, 1, generator=generator) * 2 - 1
    return colours.expand(-1, 3, 32, 32) + 0.3 * torch.randn(len(TOY_CAPTIONS), 3, 32, 32, generator=generator)


@pytest.fixture(scope="session")
def trained(clip, images):
    """``(captioner, training result)``: a one-layer captioner trained to overfit the six pairs."""
    features = encode_images(clip, images)
    captioner = build_captioner(TOY_CAPTIONS, features.shape[-1], prefix_length=2, width=32, n_layers=1, n_heads=2,
                                dropout=0.0, clip_model=clip.name, seed=0)
    result = train_captioner(captioner, features, TOY_CAPTIONS,
                             config=CaptionTrainConfig(epochs=100, batch_size=6, lr=1e-2, progress=False))
    return captioner, result


@pytest.fixture(scope="session")
def captioner(trained):
    return trained[0]
