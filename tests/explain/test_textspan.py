"""TextSpan recovers the text directions a head's contributions are built from, in order of variance."""

from __future__ import annotations

import pytest
import torch

from clipheads.explain.decomposition import Decomposition
from clipheads.explain.textspan import TextSpanResult, describe_heads, text_span


def _synthetic(n_images: int = 300, dim: int = 32, n_texts: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    texts = torch.nn.functional.normalize(torch.randn(n_texts, dim, generator=g), dim=-1)
    return g, texts


def test_recovers_known_directions_in_order():
    g, texts = _synthetic()
    chosen = [41, 7, 63]
    coefficients = torch.randn(300, 3, generator=g) * torch.tensor([4.0, 2.0, 1.0])
    head = coefficients @ texts[chosen] + 0.01 * torch.randn(300, 32, generator=g) + 5.0  # offset: variance only
    other = torch.randn(300, 3, generator=g) * torch.tensor([3.0, 1.5, 0.5]) @ texts[[2, 9, 70]]
    indices, explained, variance = text_span(torch.stack([head, other]), texts, k=4)
    assert indices[0, :3].tolist() == chosen
    assert indices[1, :3].tolist() == [2, 9, 70]
    assert explained[0, 0] > explained[0, 1] > explained[0, 2] > 20 * explained[0, 3]
    assert abs(float(explained[0, :3].sum()) - 1.0) < 0.02  # three directions explain the head
    assert torch.allclose(variance[0], head.var(0, unbiased=False).sum(), rtol=1e-4)


def test_a_chosen_text_is_projected_out_of_the_others():
    """A near-duplicate of the first pick loses its norm and is not picked second."""
    g, texts = _synthetic()
    texts[5] = torch.nn.functional.normalize(texts[41] + 0.05 * texts[5], dim=0)
    head = torch.randn(300, 2, generator=g) * torch.tensor([4.0, 2.0]) @ texts[[41, 7]]
    indices, _, _ = text_span(head[None], texts, k=2)
    assert indices[0].tolist() == [41, 7]


def test_describe_heads_labels_every_head(tmp_path):
    g, texts = _synthetic(dim=16, n_texts=30)
    names = [f"text {i}" for i in range(30)]
    heads = torch.randn(50, 2, 3, 16, generator=g)  # [N, S, H, D]
    heads[:, 1, 2] = torch.randn(50, 1, generator=g) * texts[[12]]  # L3.H2 varies along text 12 only
    zeros = torch.zeros(50, 4, 16)
    parts = Decomposition(heads, [1, 3], zeros, zeros, torch.zeros(50, 16), torch.zeros(16))
    result = describe_heads(parts, texts, names, k=3)
    assert [d.label for d in result.heads] == ["L1.H0", "L1.H1", "L1.H2", "L3.H0", "L3.H1", "L3.H2"]
    assert result["L3.H2"].texts[0] == "text 12" and result["L3.H2"].explained[0] > 0.99
    assert all(len(d.texts) == 3 for d in result.heads)
    loaded = TextSpanResult.load(result.save(tmp_path / "descriptions.json"))
    assert loaded.descriptions() == result.descriptions() and loaded.k == 3


def test_moments_accumulated_over_batches_give_the_same_descriptions():
    """TextSpan from per-head means and covariances summed batch by batch equals TextSpan over all contributions."""
    from clipheads.explain.textspan import HeadMoments, describe_moments

    g, texts = _synthetic(dim=16, n_texts=30)
    names = [f"text {i}" for i in range(30)]
    heads = torch.randn(61, 2, 3, 16, generator=g) * torch.linspace(0.5, 3.0, 16) + 5.0  # off-centre, unequal
    zeros = torch.zeros(61, 4, 16)
    full = describe_heads(Decomposition(heads, [1, 3], zeros, zeros, torch.zeros(61, 16), torch.zeros(16)), texts,
                          names, k=4, rank=8)
    moments = HeadMoments()
    for start, stop in [(0, 1), (1, 20), (20, 27), (27, 61)]:
        moments.update(heads[start:stop].flatten(1, 2))
    flat = heads.flatten(1, 2).double().transpose(0, 1)
    centered = flat - flat.mean(dim=1, keepdim=True)
    torch.testing.assert_close(moments.covariance(), centered.transpose(1, 2) @ centered / 61, atol=1e-10, rtol=0)
    streamed = describe_moments(moments, [1, 3], 3, texts, names, k=4, rank=8)
    assert streamed.descriptions() == full.descriptions() and streamed.n_images == 61 and streamed.rank == 8
    for a, b in zip(streamed.heads, full.heads, strict=True):
        assert a.explained == pytest.approx(b.explained, abs=1e-6) and a.variance == pytest.approx(b.variance)


def test_describe_model_streams_batches_and_equals_the_whole_decomposition():
    from clipheads.explain.decomposition import decompose_batches
    from clipheads.explain.pipeline import describe_model
    from clipheads.explain.pool import TextPool, known_texts
    from clipheads.models.random_init import tiny_model

    backend = tiny_model("hf", seed=2)
    pixels = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    words = ["red", "green", "blue", "cat", "dog", "car", "tree", "house", "circle", "square"]
    pool = TextPool([f"a {a} {b}" for a in words[:3] for b in words[3:]], [frozenset()] * 21, "test")
    batches = [pixels[:15], pixels[15:16], pixels[16:]]
    streamed = describe_model(backend, batches, pool, k=3, rank=8)
    features = backend.encode_text(known_texts(backend, pool).texts).detach()
    whole = describe_heads(decompose_batches(backend, batches), features, pool.texts, k=3, rank=8)
    assert streamed.descriptions() == whole.descriptions() and streamed.n_images == 40
    for a, b in zip(streamed.heads, whole.heads, strict=True):
        assert a.explained == pytest.approx(b.explained, abs=1e-6)
