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


@pytest.fixture()
def run_main(monkeypatch, capsys):
    """Run ``clipheads ARGS`` through the real entry point (``clipheads.cli.main``: one ``error:`` line, exit 2).

    Returns ``(exit_code, stdout, stderr)``. With ``forbid_load=True`` loading a model fails the test, which shows
    that a refusal came before any work.
    """
    import logging
    import sys

    import clipheads
    from clipheads.cli import main

    def run(*args, forbid_load: bool = False):
        if forbid_load:
            def no_load(*_, **__):
                raise AssertionError("a model was loaded before the refusal")

            monkeypatch.setattr(clipheads, "load", no_load)
        monkeypatch.setattr(sys, "argv", ["clipheads", *map(str, args)])
        level = logging.getLogger().level
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            logging.getLogger().setLevel(level)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
