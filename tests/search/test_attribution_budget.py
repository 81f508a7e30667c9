"""The attribution scan under a memory budget: smaller gated batches, the same estimate (to 1e-6: the CPU's matmul
takes other kernels for other batch sizes), and one line when one image's graph does not fit."""

from __future__ import annotations

import pytest
import torch

from clipheads.errors import ClipHeadsError
from clipheads.search.attribution import attribution_rows, attribution_scan
from clipheads.search.memory import forward_bytes


def _graph(backend, pixels, rows: int) -> int:
    tokens, width = backend.embed(pixels[:1]).shape[1:]
    return backend.n_layers * forward_bytes(rows, tokens, width, backend.n_heads, 4)


@pytest.mark.parametrize("order", [1, 2])
def test_budgeted_batches_give_the_all_in_memory_estimate(planted_setup, order):
    backend, pixels, captions, _ = planted_setup
    texts = (captions, torch.arange(len(captions)))
    expected = attribution_scan(backend, pixels, *texts, batch_size=8, order=order)  # one pass over all 8 images
    for rows in (4, 2):
        budget = _graph(backend, pixels, rows)
        assert attribution_rows(backend, pixels, 8, budget) == rows
        assert attribution_rows(backend, pixels, 8, budget - 1) == rows // 2
        got = attribution_scan(backend, pixels, *texts, batch_size=8, order=order, memory_budget=budget)
        assert got.surrogate == pytest.approx(expected.surrogate, abs=1e-6)
        torch.testing.assert_close(got.estimated_delta, expected.estimated_delta, atol=1e-6, rtol=0)
        assert got.estimated_delta.abs().max() > 1e-3  # an estimate that says something


def test_a_budget_too_small_for_one_image_is_one_line(planted_setup):
    backend, pixels, captions, _ = planted_setup
    with pytest.raises(ClipHeadsError, match="too small for the attribution scan: the graph of one image"):
        attribution_scan(backend, pixels, captions, torch.arange(len(captions)), memory_budget="1KiB")
