"""The main job: `clipheads demo --quick` completes on the bundled model and writes the report and JSON."""

from __future__ import annotations

import json
import re

import pytest
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
    pngs = sorted(path.name for path in tmp_path.glob("fig_*.png"))  # every figure also beside the report
    assert "fig_head_effects.png" in pngs and len(pngs) == html.count("<figure>") == html.count("<figcaption>")
    assert html.count("<img alt=\"") == len(pngs) and 'alt=""' not in html
    assert 0 < summary["selection_chance"] < 100
    for name in ("greedy", "aat_ga", "aat_bp"):
        assert json.loads((tmp_path / f"mask_{name}.json").read_text())["format"] == "clipheads.HeadMask/1"
    # the head atlas: beside the report, linked from it, built from what the demo computed
    assert '<a href="atlas.html">atlas.html</a>' in html
    page = (tmp_path / "atlas.html").read_text()
    atlas = json.loads(re.search(r'<script type="application/json" id="atlas-data">(.*?)</script>', page, re.S)[1])
    assert atlas["format"] == "clipheads.Atlas/1" and len(atlas["images"]) == summary["atlas_images"] == 24
    assert len(atlas["heads"]) == 48 and set(atlas["measures"]) == {"scan effect", "cue share", "CCS"}
    described = {d["head"]: d["texts"] for d in summary["descriptions"]["heads"]}
    for head in atlas["heads"]:
        layer, h = head["layer"], head["index"]
        assert head["measures"]["cue share"] == pytest.approx(summary["cue_share"][layer][h], abs=1e-6)
        assert head["measures"]["scan effect"] == pytest.approx(summary["single_head_delta_val_ood"][layer][h],
                                                                abs=1e-5)
        assert [t["text"] for t in head["texts"]] == described[head["head"]]
        assert len(head["spatial"]) == len(head["attention"]) == 3 and len(head["top"]) == 6
    assert summary["timings_s"]["atlas"] > 0 and len(page) < 2_000_000


def test_demo_refuses_a_folder_whose_world_is_not_its_own(tmp_path, run_main):
    (tmp_path / "world" / "images" / "holiday").mkdir(parents=True)
    (tmp_path / "world" / "images" / "holiday" / "README.txt").write_text("notes\n")
    code, _, err = run_main("demo", "--quick", "--out", tmp_path, forbid_load=True)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert (tmp_path / "world" / "images" / "holiday" / "README.txt").read_text() == "notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # nothing written before the refusal


def test_a_users_own_summary_json_in_the_demo_folder_is_refused_before_any_work(tmp_path, run_main):
    """A valid JSON file of the user's under a result's name: not in clipheads' list of its outputs, so refused."""
    (tmp_path / "summary.json").write_text('{"my": "own results"}\n')
    code, _, err = run_main("demo", "--quick", "--out", tmp_path, forbid_load=True)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "summary.json" in lines[0]
    assert "not on the list of files clipheads wrote" in lines[0]
    assert (tmp_path / "summary.json").read_text() == '{"my": "own results"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_demo_folder_passes_its_own_checks_and_keeps_other_files(tmp_path):
    from clipheads.demo.pipeline import DEMO_OUTPUTS
    from clipheads.errors import OutputError
    from clipheads.files import check_output_dir, write_json_atomic
    from clipheads.report import Report
    from clipheads.world import WorldSizes, make_world
    from clipheads.world.make import check_world_folder

    sizes = WorldSizes(train=0, val_ood=2, test_ood=2, test_iid=2, test_anti=2, compositional=0, counterfactual=1)
    check_output_dir(tmp_path, DEMO_OUTPUTS)  # as the demo does first: its writes are then listed
    make_world(tmp_path / "world", sizes=sizes, progress=False)  # what an earlier demo left
    write_json_atomic(tmp_path / "summary.json", {"model": "bundled"})
    write_json_atomic(tmp_path / "mask_greedy.json", {"format": "clipheads.HeadMask/1"})
    Report("demo").save(tmp_path / "report.html")
    (tmp_path / "notes.txt").write_text("mine")  # another file beside the demo's is left alone
    assert check_output_dir(tmp_path, DEMO_OUTPUTS) == tmp_path
    assert check_world_folder(tmp_path / "world")  # its own world: replaced on the next run
    (tmp_path / "atlas.html").write_text("my own atlas notes")  # the demo writes atlas.html too: never over this
    with pytest.raises(OutputError, match="atlas.html.*is not an HTML file"):
        check_output_dir(tmp_path, DEMO_OUTPUTS)
    (tmp_path / "atlas.html").unlink()
    (tmp_path / "report.html").write_text("my own notes, not a clipheads report")
    with pytest.raises(OutputError, match="report.html.*is not an HTML file"):
        check_output_dir(tmp_path, DEMO_OUTPUTS)
