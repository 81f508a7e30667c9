"""Soft pruning by CCS: the numbers are evaluations of the model under the equivalent head mask."""

from __future__ import annotations

import pytest
import torch

import clipheads
from clipheads.errors import ClipHeadsError
from clipheads.explain.concepts import CCSResult, HeadConcept
from clipheads.explain.prune import compare_pruning, random_heads, select_heads
from clipheads.models import as_backend
from clipheads.models.random_init import random_hf_clip


@pytest.fixture(scope="module")
def model():
    return random_hf_clip("tiny")


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(5)
    return torch.randn(8, 3, 32, 32)


def _ccs(scores: list[list[int]], k: int = 5) -> CCSResult:
    heads = [HeadConcept(layer, head, "c", ["t"] * k, [i < s for i in range(k)])
             for layer, row in enumerate(scores) for head, s in enumerate(row)]
    return CCSResult(heads, k, (len(scores), len(scores[0])), ["fake"], "fake")


def test_groups_top_and_random_heads():
    result = _ccs([[5, 0, 3, 1], [5, 2, 4, 5]])
    assert select_heads(result, group="high") == [(0, 0), (1, 0), (1, 3)]
    assert select_heads(result, group="low") == [(0, 1), (0, 3)]
    assert select_heads(result, group="moderate") == [(0, 2), (1, 1), (1, 2)]
    assert select_heads(result, top=4) == [(0, 0), (1, 0), (1, 3), (1, 2)]
    with pytest.raises(ClipHeadsError):
        select_heads(result, group="high", top=2)
    draws = [random_heads(3, (2, 4), seed) for seed in range(3)]
    assert all(len(set(d)) == 3 for d in draws) and draws[0] == random_heads(3, (2, 4), 0) and draws[0] != draws[1]


def test_top_beyond_the_scored_heads_and_no_choice_are_refused():
    """``prune --top 1000`` pruned all 48 heads and compared them with 'random' sets that were the same 48 heads;
    ``prune`` without --group or --top said 'not both'."""
    result = _ccs([[5, 0, 3, 1], [5, 2, 4, 5]])
    assert len(select_heads(result, top=7)) == 7
    for top in (8, 1000):
        with pytest.raises(ClipHeadsError, match=f"--top {top} is out of range: 8 heads were scored .* at most 7"):
            select_heads(result, top=top)
    partial = CCSResult(result.heads[:3], 5, (2, 4), ["fake"], "fake")  # only some heads scored (describe --layers)
    with pytest.raises(ClipHeadsError, match="at most 3"):
        select_heads(partial, top=4)
    with pytest.raises(ClipHeadsError, match="choose the heads to prune: a CCS group"):
        select_heads(result)


def _similarity_task(images: torch.Tensor):
    """A stand-in task: mean cosine between each image embedding and the first one."""

    @torch.no_grad()
    def task(model, mask, operator):
        if mask is None:
            features = model.encode_image(images, normalize=True)
        else:
            with clipheads.ablate(model, mask, operator):
                features = model.encode_image(images, normalize=True)
        return {"similarity": float((features @ features[0]).mean())}

    return task


@torch.no_grad()
def test_pruning_equals_evaluation_under_the_equivalent_mask(model, images):
    heads = [(1, 2), (0, 1)]
    task = _similarity_task(images)
    report = compare_pruning(model, heads, {"toy": task}, op="scale", alpha=0.25, seeds=(0, 1))
    assert report.selected.heads == ["L0.H1", "L1.H2"] and [len(r.heads) for r in report.random] == [2, 2]
    # the same mask folded into the weights (another code path) gives the same numbers
    mask = clipheads.HeadMask.from_heads("L1.H2,L0.H1", model)
    baked = as_backend(clipheads.bake(model, mask, op="scale", alpha=0.25))
    features = baked.encode_image(images, normalize=True)
    assert report.selected.metrics["toy/similarity"] == pytest.approx(float((features @ features[0]).mean()), abs=1e-6)
    assert report.baseline["toy/similarity"] == pytest.approx(task(model, None, None)["similarity"], abs=1e-7)
    for run in report.random:
        random_mask = clipheads.HeadMask.from_heads(run.heads, model)
        baked = as_backend(clipheads.bake(model, random_mask, op="scale", alpha=0.25))
        features = baked.encode_image(images, normalize=True)
        assert run.metrics["toy/similarity"] == pytest.approx(float((features @ features[0]).mean()), abs=1e-6)
    changes = report.changes()
    assert set(changes) == {"selected", "random x2"}
    assert report.to_dict()["operator"] == {"name": "scale", "alpha": 0.25}
    assert model.intervention is None and not model.hooked_layers


def test_mean_pruning_needs_means_and_other_operators_are_refused(model, images):
    task = _similarity_task(images)
    with pytest.raises(ClipHeadsError, match="head means"):
        compare_pruning(model, [(0, 0)], {"toy": task}, op="mean")
    means = clipheads.compute_head_means(model, images)
    report = compare_pruning(model, [(0, 0)], {"toy": task}, op="mean", means=means, seeds=(0,))
    assert report.operator == {"name": "mean"}
    with pytest.raises(ClipHeadsError, match="scale or mean"):
        compare_pruning(model, [(0, 0)], {"toy": task}, op="zero")
