"""The judge calibration's threshold search: tied scores fall on one side, the accuracy reported is reached."""

from __future__ import annotations

import torch

from clipheads.explain.judges import best_threshold


def _balanced(scores: torch.Tensor, positive: torch.Tensor, threshold: float) -> float:
    called = scores >= threshold
    return 0.5 * (float((called & positive).sum()) / int(positive.sum())
                  + float((~called & ~positive).sum()) / int((~positive).sum()))


def test_tied_scores_cannot_be_split():
    # a positive and a negative share the score 0.5: no threshold calls one consistent without the other
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    positive = torch.tensor([True, True, False, False])
    threshold, balanced = best_threshold(scores, positive)
    assert balanced == _balanced(scores, positive, threshold) == 0.75  # not the 1.0 of splitting the tie
    for order in ([1, 2, 0, 3], [2, 1, 3, 0]):  # whatever order the ties come in
        assert best_threshold(scores[order], positive[order]) == (threshold, balanced)


def test_reported_accuracy_is_reached_on_many_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (400,), generator=generator).float() / 5  # 6 distinct values: ties everywhere
    positive = torch.rand(400, generator=generator) < scores * 0.8
    threshold, balanced = best_threshold(scores, positive)
    assert balanced == max(_balanced(scores, positive, float(t)) for t in scores.unique())
    assert abs(balanced - _balanced(scores, positive, threshold)) < 1e-12 and balanced > 0.6


def test_separable_scores_reach_one():
    assert best_threshold(torch.tensor([0.2, 0.8, 0.7, 0.1]), torch.tensor([False, True, True, False])) == (
        torch.tensor(0.7).item(), 1.0)
