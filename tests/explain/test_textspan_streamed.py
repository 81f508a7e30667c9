"""Streamed TextSpan (second moments accumulated over image chunks) picks what the all-in-memory TextSpan picks, with
the same projector, and describe_model streams under a budget that does not hold every image's contributions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from clipheads.errors import ClipHeadsError
from clipheads.explain.decomposition import Decomposition, decompose_batches
from clipheads.explain.pipeline import describe_model, explain_plan
from clipheads.explain.pool import TextPool
from clipheads.explain.textspan import (
    HeadMoments,
    _basis,
    _text_span,
    describe_heads,
    describe_heads_streamed,
)

_spec = importlib.util.spec_from_file_location("textspan_tests", Path(__file__).with_name("test_textspan.py"))
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)


def _moments(head: torch.Tensor, chunk: int = 7) -> HeadMoments:
    """Moments of one head's ``[N, D]`` contributions, added ``chunk`` images at a time."""
    moments = HeadMoments([0], 1, head.shape[-1])
    for part in head.split(chunk):
        zeros = torch.zeros(len(part), 1, head.shape[-1])
        moments.add(Decomposition(part[:, None, None], [0], zeros, zeros, zeros[:, 0], torch.zeros(head.shape[-1])))
    return moments


def _streamed(head: torch.Tensor, texts: torch.Tensor, k: int, rank: int):
    moments = _moments(head)
    names = [str(i) for i in range(len(texts))]
    result = describe_heads_streamed(moments, texts, names, k=k, rank=rank)
    return [int(t) for t in result.heads[0].texts], result.heads[0]


@pytest.mark.parametrize("rank", [80, 4, 3])
def test_streamed_picks_are_the_published_ones_at_ranks_80_4_and_3(rank):
    data, texts = reference._planted()
    k = min(4, rank)
    published = reference.published_picks(data.double().numpy(), texts.double().numpy(), k, rank)
    indices, explained, variance, ranks = _text_span(data[None], texts, k=k, rank=rank)
    picks, head = _streamed(data, texts, k, rank)
    assert picks == published == indices[0].tolist()
    assert head.rank == int(ranks[0])
    torch.testing.assert_close(torch.tensor(head.explained), explained[0], atol=2e-6, rtol=0)
    assert head.variance == pytest.approx(float(variance[0]), rel=1e-6)


@pytest.mark.parametrize("rank", [80, 4, 3])
def test_streamed_projector_is_the_in_memory_one(rank):
    """The texts are projected onto the span of the top right singular vectors: from the SVD of C (in memory) and
    from the eigenvectors of C^T C (streamed), the same projector to float64 rounding."""
    data, _ = reference._planted()
    double = data.double()[None]
    _, singular, vh = torch.linalg.svd(double, full_matrices=False)
    in_memory_ranks, in_memory = _basis(singular, vh, rank)
    moments = _moments(data)
    eigenvalues, eigenvectors = torch.linalg.eigh(moments.gram)
    streamed_ranks, streamed = _basis(eigenvalues.flip(-1).clamp(min=0).sqrt(), eigenvectors.flip(-1).mT, rank)
    assert torch.equal(in_memory_ranks, streamed_ranks)
    torch.testing.assert_close(streamed @ streamed.mT, in_memory @ in_memory.mT, atol=1e-9, rtol=0)
    torch.testing.assert_close(moments.sums[0], double[0].sum(0), atol=1e-9, rtol=0)


def test_streamed_rank_is_clamped_like_the_in_memory_one():
    g, texts = reference._synthetic()
    head = (torch.randn(300, 3, generator=g) * torch.tensor([4.0, 2.0, 1.0]) @ texts[[41, 7, 63]])
    picks, described = _streamed(head, texts, 5, 80)
    assert described.rank == 3 and picks == [41, 7, 63, 0, 1]
    assert max(abs(v) for v in described.explained[3:]) < 1e-9


def test_streamed_describe_heads_equals_in_memory_on_every_head():
    g, texts = reference._synthetic(dim=16, n_texts=30)
    names = [f"text {i}" for i in range(30)]
    heads = torch.randn(50, 2, 3, 16, generator=g)
    heads[:, 1, 2] = torch.randn(50, 1, generator=g) * texts[[12]] + 0.01 * torch.randn(50, 16, generator=g)
    zeros = torch.zeros(50, 4, 16)
    whole = Decomposition(heads, [1, 3], zeros, zeros, torch.zeros(50, 16), torch.zeros(16))
    expected = describe_heads(whole, texts, names, k=3)
    moments = HeadMoments([1, 3], 3, 16)
    for i in range(0, 50, 8):
        moments.add(Decomposition(heads[i:i + 8], [1, 3], zeros[i:i + 8], zeros[i:i + 8], torch.zeros(8, 16)[:len(
            heads[i:i + 8])], torch.zeros(16)))
    got = describe_heads_streamed(moments, texts, names, k=3)
    assert got.descriptions() == expected.descriptions() and got.n_images == 50
    for a, b in zip(got.heads, expected.heads, strict=True):
        assert a.rank == b.rank and a.variance == pytest.approx(b.variance, rel=1e-6)
        assert a.explained == pytest.approx(b.explained, abs=2e-6)


def test_describe_model_streams_under_a_small_budget_with_the_same_picks(tiny_hf):
    torch.manual_seed(0)
    pixels = torch.randn(160, 3, 32, 32)  # enough images for their contributions to outweigh the moments
    words = ["a cat", "a dog", "red", "blue", "a tree", "the sea", "a car", "two birds", "a house", "snow"]
    pool = TextPool([f"a photo of {w}" for w in words], [frozenset()] * len(words), "test")
    batches = list(pixels.split(32))
    full = explain_plan(tiny_hf, 160, 32)
    assert not full.streamed and full.budget_bytes is None
    budget = full.held_bytes - 1  # every image's contributions no longer fit
    plan = explain_plan(tiny_hf, 160, 32, memory_budget=budget)
    assert plan.streamed and plan.held_bytes <= budget and "streamed in chunks of" in plan.describe()
    expected = describe_model(tiny_hf, batches, pool, k=3)
    got = describe_model(tiny_hf, batches, pool, k=3, memory_budget=budget)
    assert got.descriptions() == expected.descriptions()
    assert got.meta["memory_plan"] == plan.describe() and "memory_plan" not in expected.meta
    for a, b in zip(got.heads, expected.heads, strict=True):
        assert a.explained == pytest.approx(b.explained, abs=2e-6) and a.rank == b.rank
    # chunks smaller than the batches: the plan halves them until the moments and one chunk fit
    moments = HeadMoments.bytes_for(tiny_hf.n_layers * tiny_hf.n_heads, int(decompose_batches(
        tiny_hf, [pixels[:2]]).heads.shape[-1]))
    small = explain_plan(tiny_hf, 160, 32, memory_budget=moments + (plan.held_bytes - moments) // 3)
    assert small.streamed and small.chunk < 32
    assert describe_model(tiny_hf, batches, pool, k=3, plan=small).descriptions() == expected.descriptions()


def test_a_budget_too_small_for_one_image_is_one_line(tiny_hf):
    with pytest.raises(ClipHeadsError, match="too small for the head explanations: the second moments of 8 heads"):
        explain_plan(tiny_hf, 24, 8, memory_budget="1KiB")
    with pytest.raises(ClipHeadsError, match="needs n_images"):
        describe_model(tiny_hf, iter([torch.zeros(2, 3, 32, 32)]), memory_budget="1GiB")
