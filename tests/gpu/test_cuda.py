"""On a CUDA device, ablation, the mask search and the attribution scan give the CPU's results (skipped without
CUDA; CI has none). Run on a GPU machine with ``pytest tests/gpu``."""

from __future__ import annotations

import copy

import pytest
import torch

import clipheads
from clipheads.models.random_init import tiny_model
from clipheads.search import MaskEvaluator, Objective, scan_heads
from clipheads.search.attribution import attribution_scan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def objective(weights: torch.Tensor) -> Objective:
    return Objective(lambda f: float((torch.tanh(f.float().cpu()) * weights[: f.shape[1]]).sum()), "feature_sum")


@pytest.fixture(scope="module", params=["hf", "open_clip"])
def pair(request):
    """The same tiny model on the CPU and on the GPU, and a few images."""
    cpu = tiny_model(request.param, seed=5)
    gpu = copy.deepcopy(cpu).to("cuda")
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return cpu, gpu, pixels


def test_ablated_encoding_matches_the_cpu(pair):
    cpu, gpu, pixels = pair
    mask = clipheads.HeadMask.from_heads(["L0.H1", "L1.H3"], cpu)
    for op in ("identity", "cls", "zero"):
        with torch.no_grad(), clipheads.ablate(cpu, mask, op=op), clipheads.ablate(gpu, mask, op=op):
            torch.testing.assert_close(gpu.encode_image(pixels).cpu(), cpu.encode_image(pixels), atol=1e-4, rtol=1e-4)


def test_scan_matches_the_cpu(pair):
    cpu, gpu, pixels = pair
    weights = torch.randn(512, generator=torch.Generator().manual_seed(1))
    on_cpu = scan_heads(MaskEvaluator(cpu, pixels, objective(weights), batch_size=16), max_top_k=0)
    on_gpu = scan_heads(MaskEvaluator(gpu, pixels.cuda(), objective(weights), batch_size=16), max_top_k=0)
    torch.testing.assert_close(on_gpu.scores, on_cpu.scores, atol=1e-3, rtol=1e-4)


def test_attribution_matches_the_cpu(pair):
    cpu, gpu, pixels = pair
    texts = torch.randn(6, cpu.encode_image(pixels[:1]).shape[1], generator=torch.Generator().manual_seed(2))
    on_cpu = attribution_scan(cpu, pixels, texts, torch.arange(6), batch_size=4).estimated_delta
    on_gpu = attribution_scan(gpu, pixels.cuda(), texts.cuda(), torch.arange(6), batch_size=4).estimated_delta
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_ablation_runs_close_to_fp32(pair, dtype):
    _, gpu, pixels = pair
    half = copy.deepcopy(gpu).to(dtype=dtype)
    mask = clipheads.HeadMask.from_heads(["L1.H0"], gpu)
    with torch.no_grad(), clipheads.ablate(gpu, mask), clipheads.ablate(half, mask):
        reference = gpu.encode_image(pixels)
        features = half.encode_image(pixels)
    assert features.dtype == dtype
    cosine = torch.nn.functional.cosine_similarity(features.float(), reference, dim=-1)
    assert (cosine > 0.99).all()
