"""The search's memory budget: sizes, the planner's choices, and planned evaluation equal to all-in-memory evaluation
(scan, GA, BP and the exact check of an attribution estimate) to the last bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipheads.errors import ClipHeadsError
from clipheads.search import BPConfig, GAConfig, MaskEvaluator, bp_search, ga_search, scan_heads
from clipheads.search.attribution import attribution_scan
from clipheads.search.memory import default_budget, forward_bytes, parse_size, plan_cache
from clipheads.search.scan import single_head_masks
from clipheads.search.verify import verify_attribution

BATCH = 16


@pytest.mark.parametrize(("text", "size"), [("512MiB", 512 * 2 ** 20), ("8GiB", 8 * 2 ** 30), ("2GB", 2 * 10 ** 9),
                                            ("1.5g", 1_500_000_000), ("4096", 4096), (" 3 KiB ", 3072), (77, 77)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "8 parsecs", "GiB", "-1GiB", "0", "1e9"])
def test_bad_sizes_are_one_line(text):
    with pytest.raises(ClipHeadsError, match="memory"):
        parse_size(text)


def test_default_budget_is_part_of_the_free_host_memory():
    budget = default_budget("cpu")
    assert budget > 0


SHAPE = {"n_images": 1000, "n_layers": 12, "n_heads": 12, "tokens": 197, "width": 768, "model_dtype": torch.float32,
         "batch_size": 64}
LAYER = 1000 * 197 * 768 * 4  # bytes of one cached layer of 1000 ViT-B/16 images in fp32


def test_planner_keeps_everything_when_it_fits_then_fewer_layers_then_smaller_chunks():
    full = forward_bytes(64, 197, 768, 12, 4)
    everything = plan_cache(**SHAPE, budget=12 * LAYER + full)
    assert (everything.cache_stride, everything.n_cached, everything.rows, everything.location) == (1, 12, 64, "device")
    assert everything.cache_bytes == 12 * LAYER
    halves = plan_cache(**SHAPE, budget=12 * LAYER + full - 1)
    assert (halves.cache_stride, halves.n_cached, halves.rows) == (2, 6, 64)
    one = plan_cache(**SHAPE, budget=LAYER + full)
    assert (one.cache_stride, one.n_cached, one.rows) == (12, 1, 64)
    chunks = plan_cache(**SHAPE, budget=LAYER + full - 1)
    assert (chunks.n_cached, chunks.rows) == (1, 32)
    assert chunks.cache_bytes + chunks.forward_bytes <= LAYER + full - 1
    assert "1 layer (every 12) float32 on device" in chunks.describe() and "32 rows per forward" in chunks.describe()
    assert chunks.to_dict()["description"] == chunks.describe()


def test_planner_streams_from_the_host_on_cuda_only():
    small = LAYER // 2
    with pytest.raises(ClipHeadsError, match="too small"):
        plan_cache(**SHAPE, budget=small)
    host = plan_cache(**SHAPE, budget=small, device="cuda", host_budget=20 * LAYER)
    assert (host.location, host.cache_stride) == ("host", 1)
    assert host.forward_bytes <= small // 2


def test_planner_never_lowers_precision_by_itself_and_honours_a_chosen_one():
    assert plan_cache(**SHAPE, budget=LAYER + forward_bytes(1, 197, 768, 12, 4)).cache_dtype == "float32"
    half = plan_cache(**SHAPE, budget=None, cache_dtype=torch.bfloat16)
    assert half.cache_dtype == "bfloat16" and half.cache_bytes == 12 * LAYER // 2


def test_a_budget_too_small_for_one_image_is_one_line():
    with pytest.raises(ClipHeadsError) as error:
        plan_cache(**SHAPE, budget=parse_size("100MiB"))
    assert "\n" not in str(error.value)
    assert "memory budget 100 MiB is too small for 1000 images" in str(error.value)


# ------------------------------------------------------------------ planned == all in memory, on tiny models
@pytest.fixture(scope="module")
def reference(planted_setup):
    """The all-in-memory evaluator and its results: scan scores, a GA, a BP and an attribution check."""
    backend, pixels, captions, objective = planted_setup
    evaluator = MaskEvaluator(backend, pixels, objective, batch_size=BATCH, split="val")
    estimate = attribution_scan(backend, pixels, captions, torch.arange(len(captions)), batch_size=4, order=1)
    return evaluator, run_all(evaluator, captions, estimate.estimated_delta), estimate.estimated_delta


def run_all(evaluator: MaskEvaluator, captions: torch.Tensor, estimated_delta: torch.Tensor) -> dict:
    scan = scan_heads(evaluator, max_top_k=2)
    ga = ga_search(evaluator, GAConfig(beta=0.5, population=6, generations=2, seed=3), scan=scan)
    # under a budget with activation checkpointing (these budgets hold a forward, not BP's graph): the same gates
    bp = bp_search(evaluator, captions, torch.arange(len(captions)), BPConfig(beta=0.1, epochs=2, batch_size=4,
                                                                             lr=0.5),
                   checkpointing=evaluator.plan.budget_bytes is not None)
    check = verify_attribution(evaluator, estimated_delta, 2)
    return {"baseline": evaluator.baseline, "scan": scan.scores, "ga": (ga.mask.ablated, ga.search_metric),
            "ga_history": [h["best_fitness"] for h in ga.history], "bp_gates": bp.gates,
            "bp_loss": [h["loss"] for h in bp.history], "verified": check.exact}


def budgets(evaluator: MaskEvaluator) -> dict[str, int]:
    """Budgets that force each plan on this evaluator's model and images (chunks of 4 of the 8 images: chunks of 2
    differ in the last bits here, up to 7e-7, as the CPU's matmul takes another kernel for so few rows)."""
    n, tokens, width = evaluator.residual(0).shape
    layer = n * tokens * width * 4
    forward = forward_bytes(BATCH, tokens, width, evaluator.n_heads, 4)
    return {"all layers": evaluator.n_layers * layer + forward, "every 2nd layer": layer + forward,
            "image chunks": layer + forward_bytes(4, tokens, width, evaluator.n_heads, 4)}


@pytest.mark.parametrize("plan", ["all layers", "every 2nd layer", "image chunks", "host"])
def test_planned_evaluation_equals_all_in_memory_to_the_last_bit(planted_setup, reference, plan):
    backend, pixels, captions, objective = planted_setup
    full, expected, estimated_delta = reference
    if plan == "host":  # the planner picks it on CUDA only; the streaming path is the same on the CPU
        forced = dataclasses.replace(full.plan, location="host", rows=4, budget_bytes=1)
        evaluator = MaskEvaluator(backend, pixels, objective, batch_size=BATCH, split="val", plan=forced)
    else:
        evaluator = MaskEvaluator(backend, pixels, objective, batch_size=BATCH, split="val",
                                  memory_budget=budgets(full)[plan])
    stride, rows = {"all layers": (1, BATCH), "every 2nd layer": (2, BATCH), "image chunks": (2, 4),
                    "host": (1, 4)}[plan]
    assert (evaluator.plan.cache_stride, evaluator.plan.rows) == (stride, rows)
    assert evaluator.cached_layers == list(range(0, backend.n_layers, stride))
    assert evaluator.residual(0).device.type == "cpu"
    got = run_all(evaluator, captions, estimated_delta)
    assert got["baseline"] == expected["baseline"]
    assert torch.equal(got["scan"], expected["scan"])
    assert got["ga"] == expected["ga"] and got["ga_history"] == expected["ga_history"]
    assert torch.equal(got["bp_gates"], expected["bp_gates"]) and got["bp_loss"] == expected["bp_loss"]
    assert got["verified"] == expected["verified"]


def test_a_lower_precision_cache_chosen_explicitly_stays_within_1e_6(planted_module):
    backend = planted_module.planted_model("hf").to(dtype=torch.float64)
    pixels, captions, objective = planted_module.planted_task(backend)
    pixels, captions = pixels.double(), captions.double()
    full = MaskEvaluator(backend, pixels, objective, batch_size=BATCH)
    lower = MaskEvaluator(backend, pixels, objective, batch_size=BATCH, cache_dtype="fp32")
    assert lower.residual(0).dtype == torch.float32 and lower.plan.cache_dtype == "float32"
    assert full.plan.cache_dtype == "float64"
    masks = list(single_head_masks(full).values())
    for got, expected in zip(lower.features_many(masks), full.features_many(masks), strict=True):
        assert not torch.equal(got, expected)  # the cache really is coarser
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(scan_heads(lower).scores, scan_heads(full).scores, atol=1e-6, rtol=0)


def test_evaluator_refuses_a_budget_too_small_for_one_image(planted_setup):
    backend, pixels, _, objective = planted_setup
    with pytest.raises(ClipHeadsError, match="too small for 8 images"):
        MaskEvaluator(backend, pixels, objective, memory_budget="1KiB")
