"""TextSpan recovers the text directions a head's contributions are built from, in order of variance."""

from __future__ import annotations

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
