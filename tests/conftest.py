"""Shared fixtures: tiny randomly initialised models of the real architectures, built offline."""

from __future__ import annotations

import pytest
import torch

from clipheads.models.random_init import TINY_KINDS, tiny_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

BACKENDS = TINY_KINDS


def make_tiny(kind: str, seed: int = 0):
    return tiny_model(kind, seed=seed)


@pytest.fixture(scope="session", params=BACKENDS)
def tiny_backend(request):
    """One tiny model per backend family (session-wide: tests must leave it unablated)."""
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_hf():
    return make_tiny("hf")


@pytest.fixture()
def pixels():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)
