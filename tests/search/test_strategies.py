"""Scan, GA, BP and greedy on a model with one planted harmful head; determinism, resume and refusals."""

from __future__ import annotations

import json

import pytest
import torch

import clipheads
from clipheads.errors import ClipHeadsError
from clipheads.search import (
    BPConfig,
    ConfigMismatchError,
    GAConfig,
    GreedyConfig,
    MaskEvaluator,
    RunFolder,
    beta_sweep,
    bp_search,
    ga_search,
    greedy_search,
    scan_heads,
    scan_layers,
    scan_search_result,
)
from clipheads.search.attribution import attribution_scan

GA = GAConfig(beta=4.0, population=8, generations=4, seed=1)
PLANTED = "L1.H2"


@pytest.fixture(autouse=True)
def _planted_head_is(planted_module):
    assert planted_module.PLANTED == PLANTED


@pytest.fixture()
def evaluator(planted_setup):
    backend, pixels, _, objective = planted_setup
    return MaskEvaluator(backend, pixels, objective, batch_size=16, split="val")


def test_scan_finds_the_planted_head(evaluator, tmp_path):
    scan = scan_heads(evaluator, RunFolder(tmp_path, {"strategy": "scan"}))
    assert scan.ranking()[0] == PLANTED
    assert scan.harmful() == [PLANTED]
    assert scan.top_k[0] == {"k": 1, "heads": [PLANTED], "metric": pytest.approx(scan.scores[1, 2].item())}
    assert scan_search_result(scan, evaluator).mask.ablated == [PLANTED]
    assert (tmp_path / "head_effects.png").stat().st_size > 0
    written = json.loads((tmp_path / "scan.json").read_text())
    assert written["harmful"] == [PLANTED]
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 8


def test_ga_finds_the_planted_head_and_writes_outputs(evaluator, tmp_path):
    result = ga_search(evaluator, GA, RunFolder(tmp_path, {"strategy": "ga", **GA.to_dict()}))
    assert result.mask.ablated == [PLANTED]
    assert result.search_metric > result.search_baseline
    for name in ("mask.json", "summary.json", "history.jsonl", "fitness.png", "heads_per_layer.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert clipheads.HeadMask.load(tmp_path / "mask.json").ablated == [PLANTED]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mask"]["heads_per_layer"] == [0, 1]
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == GA.generations


def test_bp_finds_the_planted_head(planted_setup, evaluator, tmp_path):
    _, _, captions, _ = planted_setup
    config = BPConfig(beta=0.5, epochs=30, batch_size=4, lr=0.3, init_logit=3.0)
    result = bp_search(evaluator, captions, torch.arange(len(captions)), config, RunFolder(tmp_path, {"bp": 1}))
    assert result.mask.ablated == [PLANTED]
    assert result.gates[1, 2] < 0.5 and (result.gates.flatten()[torch.arange(8) != 6] > 0.9).all()
    assert (tmp_path / "gates.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gates"][1][2] == pytest.approx(float(result.gates[1, 2]))


def test_bp_starts_heads_ranked_harmful_at_half_gate(planted_setup, evaluator):
    _, pixels, captions, _ = planted_setup
    backend = evaluator.backend
    estimate = attribution_scan(backend, pixels, captions, torch.arange(len(captions)), batch_size=4, order=1)
    seeded = estimate.as_scan()
    config = BPConfig(epochs=0)
    result = bp_search(evaluator, captions, torch.arange(len(captions)), config, seed_ranking=seeded)
    harmful = [clipheads.parse_head(label) for label in seeded.harmful()]
    assert (PLANTED and clipheads.parse_head(PLANTED)) in harmful
    for layer in range(backend.n_layers):
        for head in range(backend.n_heads):
            expected = 0.5 if (layer, head) in harmful else float(torch.sigmoid(torch.tensor(config.init_logit)))
            assert float(result.gates[layer, head]) == pytest.approx(expected)


def test_greedy_finds_the_planted_head(evaluator):
    result = greedy_search(evaluator, GreedyConfig(beta=4.0))
    assert result.mask.ablated == [PLANTED]


def test_ga_is_deterministic_and_resumes_to_the_same_result(evaluator, tmp_path):
    config = GAConfig(beta=0.5, population=8, generations=4, seed=7)
    full = ga_search(evaluator, config, RunFolder(tmp_path / "full", {"c": 1}))
    again = ga_search(evaluator, config)
    assert again.mask == full.mask and again.history == full.history

    def crash(generation: int, state: dict) -> None:
        if generation == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ga_search(evaluator, config, RunFolder(tmp_path / "resumed", {"c": 1}), on_generation=crash)
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert state["generation"] == 2
    seen = []
    resumed = ga_search(evaluator, config, RunFolder(tmp_path / "resumed", {"c": 1}),
                        on_generation=lambda generation, _: seen.append(generation))
    assert seen == [2, 3]  # generations 0 and 1 were not run again
    assert resumed.mask == full.mask and resumed.history == full.history
    assert (tmp_path / "resumed" / "history.jsonl").read_text() == (tmp_path / "full" / "history.jsonl").read_text()


def test_interrupted_scan_resumes_without_recomputing(planted_setup, tmp_path):
    backend, pixels, _, objective = planted_setup
    calls = []

    def flaky(features):
        calls.append(1)
        if len(calls) == 6:  # baseline + 4 heads + crash in the 3rd chunk
            raise KeyboardInterrupt
        return objective(features)

    folder = {"strategy": "scan"}
    with pytest.raises(KeyboardInterrupt):
        scan_heads(MaskEvaluator(backend, pixels, clipheads.search.Objective(flaky, "match"), batch_size=16),
                   RunFolder(tmp_path, folder), checkpoint_every=2)
    assert len(json.loads((tmp_path / "state.json").read_text())["scores"]) == 4
    counting = []
    evaluator = MaskEvaluator(backend, pixels, clipheads.search.Objective(
        lambda f: counting.append(1) or objective(f), "match"), batch_size=16)
    resumed = scan_heads(evaluator, RunFolder(tmp_path, folder), checkpoint_every=2, max_top_k=0)
    assert len(counting) == 1 + 4  # baseline + the 4 heads not yet done
    fresh = scan_heads(MaskEvaluator(backend, pixels, objective, batch_size=16), max_top_k=0)
    torch.testing.assert_close(resumed.scores, fresh.scores, atol=1e-5, rtol=0)


def test_changed_configuration_is_refused(tmp_path):
    RunFolder(tmp_path, {"strategy": "ga", "beta": 0.1})
    RunFolder(tmp_path, {"strategy": "ga", "beta": 0.1})  # same configuration: resume
    with pytest.raises(ConfigMismatchError, match=r"--beta changed from 0\.1 to 0\.2"):
        RunFolder(tmp_path, {"strategy": "ga", "beta": 0.2})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ConfigMismatchError, match="not empty"):
        RunFolder(tmp_path / "other", {"strategy": "ga"})


def test_search_refuses_to_report_on_the_searched_split(planted_setup, evaluator):
    backend, pixels, _, objective = planted_setup
    same = MaskEvaluator(backend, pixels, objective, split="val")
    with pytest.raises(ClipHeadsError, match="allow-same-split"):
        ga_search(evaluator, GA, report=same)
    result = ga_search(evaluator, GA, report=same, allow_same_split=True)
    assert result.heldout_metric == pytest.approx(result.search_metric, abs=1e-5)
    assert result.to_dict()["heldout"]["split"] == "val"


def test_layer_scan_and_beta_sweep(evaluator, tmp_path):
    layers = scan_layers(evaluator, details=lambda f: {"norm": float(f.norm())})
    assert layers.labels == ["0", "1"] and layers.details[0]["norm"] > 0
    mask = clipheads.HeadMask.from_layers("1", evaluator.backend)
    assert layers.scores[1] == evaluator.evaluate(mask)
    ranges = scan_layers(evaluator, "0-1", out=RunFolder(tmp_path / "layers", {"layers": "0-1"}))
    assert ranges.labels == ["0-1"] and (tmp_path / "layers" / "layer_scan.png").exists()

    config = GAConfig(population=8, generations=2, seed=0)
    folder = RunFolder(tmp_path / "sweep", {"strategy": "ga", "beta_sweep": [0.0, 100.0]})
    sweep = beta_sweep(evaluator, config, [0.0, 100.0], folder)
    assert sweep.results[1].mask.n_ablated == 0  # ablating anything costs more than it can gain
    assert sweep.results[0].search_metric >= sweep.results[1].search_metric
    assert (tmp_path / "sweep" / "metric_vs_beta.png").exists()
    assert (tmp_path / "sweep" / "beta_100" / "mask.json").exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: GAConfig(population=1), "population needs at least 2"),
    (lambda: GAConfig(population=4, elitism=4), "elitism must be between 0 and population - 1 = 3"),
    (lambda: GAConfig(crossover_rate=1.5), r"crossover rate must be in \[0, 1\]"),
    (lambda: GAConfig(generations=0), "at least 1 generation"),
    (lambda: BPConfig(batch_size=1), "batches of 2 or more"),
    (lambda: BPConfig(threshold=1.0), r"threshold must be in \(0, 1\)"),
    (lambda: BPConfig(epochs=-1), "cannot be negative"),
    (lambda: GreedyConfig(max_heads=0), "max heads must be at least 1"),
])
def test_configs_refuse_values_that_cannot_run(make, message):
    with pytest.raises(clipheads.ClipHeadsError, match=message):
        make()


def test_a_search_that_ablates_nothing_says_why(planted_setup, evaluator):
    _, _, captions, _ = planted_setup
    bp = bp_search(evaluator, captions, torch.arange(len(captions)), BPConfig(epochs=0))
    gate = float(torch.sigmoid(torch.tensor(BPConfig().init_logit)))
    assert bp.mask.n_ablated == 0
    assert bp.why_nothing_ablated().startswith(f"nothing ablated: lowest gate {gate:.2f} (L0.H0) >= threshold 0.5")
    assert bp.to_dict()["nothing_ablated"] == bp.why_nothing_ablated()
    greedy = greedy_search(evaluator, GreedyConfig(beta=1000.0))  # every head costs more than it can gain
    assert greedy.mask.n_ablated == 0
    assert "no single head added to the mask beat the unablated model on val" in greedy.why_nothing_ablated()
    assert greedy_search(evaluator, GreedyConfig(beta=4.0)).why_nothing_ablated() is None
