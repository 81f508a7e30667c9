"""Fixtures of the search tests: the planted-harmful-head model and its task (see planted.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("search_planted", Path(__file__).with_name("planted.py"))
planted = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(planted)


@pytest.fixture(scope="module", params=["hf", "open_clip"])
def planted_setup(request):
    """``(backend, pixels, caption features, objective)`` with head ``planted.PLANTED`` harmful."""
    backend = planted.planted_model(request.param)
    pixels, captions, objective = planted.planted_task(backend)
    return backend, pixels, captions, objective


@pytest.fixture(scope="session")
def planted_module():
    """The planted.py module (loaded by path: test folders are not packages)."""
    return planted
