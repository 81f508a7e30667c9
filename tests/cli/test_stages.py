"""Every long command prints one line per finished stage on stderr, with its time and the time left (but the last).

Run on the bundled model with a tiny retrieval world (as tests/search/test_search_cli.py builds it).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipheads.cli import app
from clipheads.world.scene import COLOURS, SHAPES

LINE = re.compile(r"^\[(\d+)/(\d+)\] (.+) done in (\d+\.\d) s(?:; about ((?:\d+ min )?\d+ s) left)?$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages_world")
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        caption = f"a {list(COLOURS)[i % 6]} {SHAPES[(i * 5) % 6]}"  # words the bundled model knows
        images.append({"filename": f"{i}.png", "split": "val" if i < 6 else "test", "imgid": i,
                       "sentences": [{"raw": caption}, {"raw": caption + " on the left"}]})
    (root / "karpathy.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    return root


def stage_lines(result) -> list[tuple[int, int, str, float, str | None]]:
    """The stage lines of a finished command's stderr, parsed; every stderr line that starts like one must be one."""
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    return [(int(m[1]), int(m[2]), m[3], float(m[4]), m[5]) for m in parsed]


def check_order(lines, names: list[str]) -> None:
    """The stages in order, numbered 1..N of N, with a time each and the time left on all but the last line."""
    assert [name for _, _, name, _, _ in lines] == names
    assert [(index, total) for index, total, *_ in lines] == [(i + 1, len(names)) for i in range(len(names))]
    assert all(seconds >= 0 for *_, seconds, _ in lines)
    assert all(left is not None for *_, left in lines[:-1]) and lines[-1][-1] is None


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def test_scan_prints_its_stages(world, tmp_path):
    result = invoke("scan", "--data", world / "karpathy.json", "--batch-size", 16, "--top-k", 2,
                    "--out", tmp_path / "scan")
    check_order(stage_lines(result), ["held-out split", "search split", "single-head scan",
                                      "held-out evaluation", "write results"])
    assert "Most harmful heads" in result.stdout  # the results stay on stdout, the stages go to stderr


def test_search_ga_prints_a_line_per_generation(world, tmp_path):
    result = invoke("search", "--data", world / "karpathy.json", "--batch-size", 16, "--strategy", "ga",
                    "--population", 4, "--generations", 3, "--report-split", "none", "--out", tmp_path / "ga")
    check_order(stage_lines(result), ["search split", "single-head scan", "AAT-GA generation 1/3",
                                      "AAT-GA generation 2/3", "AAT-GA generation 3/3",
                                      "held-out evaluation and results"])


def test_search_beta_sweep_prints_a_line_per_beta(world, tmp_path):
    result = invoke("search", "--data", world / "karpathy.json", "--batch-size", 16, "--strategy", "ga",
                    "--population", 4, "--generations", 1, "--beta-sweep", "0,0.05", "--seed-from", "none",
                    "--report-split", "none", "--out", tmp_path / "sweep")
    check_order(stage_lines(result), ["search split", "AAT-GA beta 0 (1/2)", "AAT-GA beta 0.05 (2/2)",
                                      "sweep results"])


def test_describe_prints_its_stages(world, tmp_path):
    result = invoke("describe", "--data", world / "karpathy.json", "--split", "val", "--k", 2, "--layers", "5",
                    "--batch-size", 8, "--out", tmp_path / "describe")
    check_order(stage_lines(result), ["text pool", "decompose images", "write results"])
