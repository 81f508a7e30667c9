"""The main job: `clipheads demo --quick` completes on the bundled model and writes the report and JSON."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from clipheads.cli import app
from clipheads.demo.pipeline import DemoConfig, stage_plan


def test_quick_demo_writes_report_and_summary(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--threads", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    # one line per finished stage with its time, and an estimate of the rest until the last one
    # (progress bars share the captured output: a line may start with a bar's leftovers)
    found = [re.search(r"\[(\d+)/(\d+)\] (.+?) done in (\d+\.\d) s(; about .+ left)?$", line)
             for line in result.output.splitlines()]
    stages = [m.groups(default="") for m in found if m]
    assert [name for *_, name, _, _ in stages] == list(stage_plan(DemoConfig.quick()))
    assert [int(i) for i, *_ in stages] == list(range(1, 13)) and {total for _, total, *_ in stages} == {"12"}
    assert all(left for *_, left in stages[:-1]) and not stages[-1][-1]
    assert summary["run"]["threads"] == 1 and "1 torch thread" in result.output
    assert set(summary["mean_recall"]) == {"vanilla", "greedy", "AAT-GA", "AAT-BP"}
    for scores in summary["mean_recall"].values():
        assert set(scores) == {"val_ood", "test_ood", "test_iid", "test_anti"}
        assert all(0 <= v <= 100 for v in scores.values())
    assert len(summary["single_head_delta_val_ood"]) == 6 and len(summary["cue_share"][0]) == 8
    assert abs(summary["cue_share_all_heads"]) <= 1.5
    assert len(summary["layer_scan"]) == 1 + 6 + 3  # none, each layer, each range
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "Single-head scan" in html
    for name in ("greedy", "aat_ga", "aat_bp"):
        assert json.loads((tmp_path / f"mask_{name}.json").read_text())["format"] == "clipheads.HeadMask/1"
