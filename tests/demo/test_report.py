"""The demo's HTML report from a small hand-made summary: every figure is a PNG beside report.html, every <img> has
alt text and a caption, the CCS section names its judge and its measured accuracy, the layer scan has a chance row."""

from __future__ import annotations

import re

import torch

from clipheads.demo.report import selection_chance, write_report
from clipheads.explain.concepts import CCSResult, HeadConcept

N_LAYERS, N_HEADS = 3, 4


def _summary() -> dict:
    recall = {"val_ood": 50.0, "test_ood": 51.0, "test_iid": 80.0, "test_anti": 40.0}
    layer_rows = [{"cancelled": name, "accuracy": acc, "clip_score": 80.0, "cosine": 0.8, "selected_first": "a cat",
                   "logits": [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]]} for name, acc in (("none", 50.0), ("L0", 25.0))]
    return {
        "model": "tiny", "config": {"seed": 0, "k": 3}, "wall_time_s": 1.0, "timings_s": {"scan": 0.5},
        "mean_recall": {"vanilla": recall, "greedy": {**recall, "val_ood": 52.0},
                        "AAT-GA": {**recall, "val_ood": 52.0}, "AAT-BP": {**recall, "val_ood": 51.0}},
        "ablated": {"vanilla": [], "greedy": ["L1.H2"], "AAT-GA": ["L1.H2", "L0.H0"], "AAT-BP": ["L2.H3"]},
        "single_head_delta_test_ood": torch.linspace(-3, 1, N_LAYERS * N_HEADS).reshape(N_LAYERS, N_HEADS).tolist(),
        "scan_val_test_correlation": 0.9,
        "ga_history": [{"generation": g, "best_fitness": 0.5, "mean_fitness": 0.4} for g in range(2)],
        "bp_history": [{"epoch": e, "loss": 1.0 - 0.1 * e} for e in range(2)],
        "cue_share_all_heads": 0.7, "layer_scan": layer_rows,
    }


def _ccs() -> CCSResult:
    heads = [HeadConcept(0, 1, "color", ["red", "blue", "a dog"], [True, True, False])]
    return CCSResult(heads, 3, (N_LAYERS, N_HEADS), ["clip"], "top-word",
                     meta={"calibration": {"clip": {"threshold": 0.25, "balanced_accuracy": 0.83, "n_positive": 10,
                                                    "n_negative": 90}}})


def test_report_figures_are_pngs_with_alt_text_and_captions(tmp_path):
    deltas = torch.linspace(-15, 1, N_LAYERS * N_HEADS).reshape(N_LAYERS, N_HEADS)
    path = write_report(tmp_path / "report.html", _summary(), deltas, torch.rand(N_LAYERS, N_HEADS), _ccs())
    html = path.read_text()
    figures = re.findall(r"<figure>(.*?)</figure>", html)
    pngs = sorted(p.name for p in tmp_path.glob("fig_*.png"))
    assert len(figures) == len(pngs) == 7, pngs
    assert "fig_head_effects.png" in pngs and "fig_ccs.png" in pngs
    for png in pngs:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for figure in figures:
        alt = re.search(r'<img alt="([^"]*)"', figure)
        caption = re.search(r"<figcaption>(.+)</figcaption>", figure)
        assert alt and len(alt.group(1)) > 20 and caption, figure[:200]
    # the head-effect figure's alt text names the ablated heads; the CCS section names judge and accuracy
    assert "greedy: L1.H2" in html and "AAT-BP: L2.H3" in html
    assert "judge &#x27;clip&#x27;" in html and "balanced accuracy 0.83" in html
    # chance of caption selection among 4 and 2 candidates: (1/4 + 1/2) / 2
    assert selection_chance(_summary()["layer_scan"]) == 37.5
    assert "<td>chance</td><td class=\"num\">37.50</td>" in html and "chance = mean of 1 / number of candidates" in html


def test_report_links_the_atlas_only_when_given(tmp_path):
    deltas = torch.linspace(-15, 1, N_LAYERS * N_HEADS).reshape(N_LAYERS, N_HEADS)
    share = torch.rand(N_LAYERS, N_HEADS)
    linked = write_report(tmp_path / "linked.html", _summary(), deltas, share, _ccs(), atlas="atlas.html").read_text()
    assert len(re.findall(r'<a href="atlas.html">atlas.html</a>', linked)) == 1 and "Head atlas" in linked
    plain = write_report(tmp_path / "plain.html", _summary(), deltas, share, _ccs()).read_text()
    assert "<a href=" not in plain and "Head atlas" not in plain
