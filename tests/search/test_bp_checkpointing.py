"""AAT-BP with activation checkpointing: the same gates and gradients as keeping the graph, chosen by the memory
budget only when the graph of a batch would not fit, and one line when even the checkpointed graph does not."""

from __future__ import annotations

import pytest
import torch

from clipheads.errors import ClipHeadsError
from clipheads.search import BPConfig, MaskEvaluator, bp_search
from clipheads.search.bp import graph_bytes, plan_checkpointing

CONFIG = BPConfig(beta=0.1, epochs=2, batch_size=4, lr=0.5)


def test_checkpointed_gates_equal_the_kept_graph(planted_setup):
    backend, pixels, captions, objective = planted_setup
    evaluator = MaskEvaluator(backend, pixels, objective, batch_size=16)
    pairs = (captions, torch.arange(len(captions)))
    kept = bp_search(evaluator, *pairs, CONFIG, checkpointing=False)
    checkpointed = bp_search(evaluator, *pairs, CONFIG, checkpointing=True)
    assert kept.extra["activation_checkpointing"] is False and checkpointed.extra["activation_checkpointing"] is True
    assert torch.equal(checkpointed.gates, kept.gates)
    assert [h["loss"] for h in checkpointed.history] == [h["loss"] for h in kept.history]
    assert checkpointed.mask.ablated == kept.mask.ablated


def test_checkpointed_gradient_equals_the_kept_graph(planted_setup):
    """One backward pass through the hooked layers, with and without checkpointing: the gate gradient to 1e-6."""
    from clipheads.interventions import HeadMask, ablate
    from clipheads.search.bp import _gated_features

    backend, pixels, captions, objective = planted_setup
    x = backend.embed(pixels[:4])
    gradients = []
    for checkpointing in (False, True):
        logits = torch.full((backend.n_layers, backend.n_heads), 1.5, requires_grad=True)
        with ablate(backend, HeadMask.from_tensor(torch.sigmoid(logits), backend)):
            features = _gated_features(backend, x.detach(), checkpointing)
            (features * captions[:4]).sum().backward()
        gradients.append(logits.grad)
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-6, rtol=0)


def test_the_budget_turns_checkpointing_on_only_when_the_graph_does_not_fit(planted_setup):
    backend, pixels, captions, objective = planted_setup
    full = MaskEvaluator(backend, pixels, objective, batch_size=16)
    assert plan_checkpointing(full, 4) is False  # no budget
    cache, whole, checkpointed = full.plan.cache_bytes, graph_bytes(full, 4, False), graph_bytes(full, 4, True)
    assert checkpointed < whole
    roomy = MaskEvaluator(backend, pixels, objective, batch_size=16, plan=_with_budget(full, cache + whole))
    tight = MaskEvaluator(backend, pixels, objective, batch_size=16, plan=_with_budget(full, cache + whole - 1))
    assert plan_checkpointing(roomy, 4) is False and plan_checkpointing(tight, 4) is True
    assert plan_checkpointing(full, 4, available=whole) is False and plan_checkpointing(full, 4, whole - 1) is True
    result = bp_search(tight, captions, torch.arange(len(captions)), CONFIG)
    assert result.extra["activation_checkpointing"] is True
    assert torch.equal(result.gates, bp_search(full, captions, torch.arange(len(captions)), CONFIG).gates)
    small = MaskEvaluator(backend, pixels, objective, batch_size=16, plan=_with_budget(full, cache + checkpointed - 1))
    with pytest.raises(ClipHeadsError, match="too small for AAT-BP: after the caches"):
        bp_search(small, captions, torch.arange(len(captions)), CONFIG)


def _with_budget(evaluator: MaskEvaluator, budget: int):
    import dataclasses

    return dataclasses.replace(evaluator.plan, budget_bytes=budget)
