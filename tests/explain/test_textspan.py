"""TextSpan recovers the text directions a head's contributions are built from, in order of variance."""

from __future__ import annotations

import numpy as np
import torch

from clipheads.explain.decomposition import Decomposition
from clipheads.explain.textspan import TextSpanResult, _text_span, describe_heads, text_span


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


def published_picks(data: np.ndarray, text_features: np.ndarray, iters: int, rank: int) -> list[int]:
    """clip_text_span's ``replace_with_iterative_removal`` (compute_complete_text_set.py), line by line, returning
    the indices of its picks (it returns the texts)."""
    results = []
    u, s, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    text_features = vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh)).dot(text_features.T).T
    data = torch.from_numpy(data).double()
    data = data - data.mean(dim=0, keepdim=True)
    text_features = torch.from_numpy(text_features).double()
    for _ in range(iters):
        projection = data @ text_features.T
        projection_std = projection.std(axis=0).numpy()
        top_n = int(np.argmax(projection_std))
        results.append(top_n)
        text_norm = text_features[top_n] @ text_features[top_n]  # `.T` of a 1-d tensor: a no-op
        data = data - (data @ text_features[top_n] / text_norm)[:, None] * text_features[top_n][None, :]
        text_features = (text_features - (text_features @ text_features[top_n] / text_norm)[:, None]
                         * text_features[top_n][None, :])
    return results


def _planted(seed: int = 0):
    """Contributions along texts 17, 4, 38 and 11 (std 4, 2, 1, 0.7) plus a large mean offset and a little noise."""
    g = torch.Generator().manual_seed(seed)
    texts = torch.nn.functional.normalize(torch.randn(60, 32, generator=g, dtype=torch.float64), dim=-1)
    coefficients = torch.randn(200, 4, generator=g, dtype=torch.float64) * torch.tensor([4.0, 2.0, 1.0, 0.7],
                                                                                         dtype=torch.float64)
    offset = 6.0 * torch.nn.functional.normalize(torch.randn(32, generator=g, dtype=torch.float64), dim=0)
    data = coefficients @ texts[[17, 4, 38, 11]] + offset + 0.05 * torch.randn(200, 32, generator=g,
                                                                               dtype=torch.float64)
    return data.float(), texts.float()


def test_picks_are_the_published_ones_at_ranks_80_4_and_3():
    data, texts = _planted()
    # k <= rank: a pick past the rank explains nothing and is rounding noise in the published code
    expected = {rank: published_picks(data.double().numpy(), texts.double().numpy(), min(4, rank), rank)
                for rank in (80, 4, 3)}
    assert expected[80] == [17, 4, 38, 11]  # the planted directions, in order
    assert expected[4][:3] == [17, 4, 38] and expected[4][3] != 11  # the top-4 span: the offset and 3 planted
    for rank, picks in expected.items():
        assert text_span(data[None], texts, k=len(picks), rank=rank)[0][0].tolist() == picks
    # at rank 3 the uncentred top-3 span holds the offset, not text 38: a centring projector (the old clipheads)
    # keeps 38 and differs from the published algorithm
    centred = published_picks((data - data.mean(0)).double().numpy(), texts.double().numpy(), 3, 3)
    assert centred == [17, 4, 38] and expected[3][:2] == [17, 4] and expected[3][2] != 38


def test_rank_is_clamped_to_the_numerical_rank():
    """A head that spans 3 directions uses rank 3 at the asked rank 80, and then the published picks at rank 3; its
    picks after the variance is used up explain nothing and are deterministic (the first unpicked texts)."""
    g, texts = _synthetic()
    head = (torch.randn(300, 3, generator=g) * torch.tensor([4.0, 2.0, 1.0]) @ texts[[41, 7, 63]])
    indices, explained, _, ranks = _text_span(head[None], texts, k=5, rank=80)
    assert ranks.tolist() == [3]
    assert indices[0, :3].tolist() == published_picks(head.double().numpy(), texts.double().numpy(), 3, 3)
    assert indices[0, :3].tolist() == [41, 7, 63]
    assert explained[0, 3:].abs().max() < 1e-9 and indices[0, 3:].tolist() == [0, 1]
    assert len(set(indices[0].tolist())) == 5  # a text is never picked twice
