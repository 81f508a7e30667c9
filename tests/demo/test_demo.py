"""The main job: `clipheads demo --quick` completes on the bundled model and writes the report and JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from clipheads.cli import app


def test_quick_demo_writes_report_and_summary(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["mean_recall"]) == {"vanilla", "greedy", "AAT-GA", "AAT-BP"}
    for scores in summary["mean_recall"].values():
        assert set(scores) == {"val_ood", "test_ood", "test_iid", "test_anti"}
        assert all(0 <= v <= 100 for v in scores.values())
    assert len(summary["single_head_delta_val_ood"]) == 6 and len(summary["cue_share"][0]) == 8
    assert abs(summary["cue_share_all_heads"]) <= 1.5
    assert len(summary["layer_scan"]) == 1 + 6 + 3  # none, each layer, each range
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "Single-head scan" in html
    pngs = sorted(path.name for path in tmp_path.glob("fig_*.png"))  # every figure also beside the report
    assert "fig_head_effects.png" in pngs and len(pngs) == html.count("<figure>") == html.count("<figcaption>")
    assert html.count("<img alt=\"") == len(pngs) and 'alt=""' not in html
    assert 0 < summary["selection_chance"] < 100
    for name in ("greedy", "aat_ga", "aat_bp"):
        assert json.loads((tmp_path / f"mask_{name}.json").read_text())["format"] == "clipheads.HeadMask/1"
