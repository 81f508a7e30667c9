"""``clipheads describe`` and ``clipheads ccs`` on a tiny saved model and a folder of images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipheads.cli import app
from clipheads.models.random_init import random_hf_clip, save_hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_cli")
    save_hf(random_hf_clip("tiny"), root / "model")
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_describe_then_ccs_from_descriptions(setup):
    runner = CliRunner()
    out = setup / "out"
    result = runner.invoke(app, ["describe", "--model", str(setup / "model"), "--data", str(setup / "images"),
                                 "--k", "3", "--layers", "1", "--out", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    described = json.loads((out / "descriptions.json").read_text())
    assert [h["head"] for h in described["heads"]] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert described["n_images"] == 10 and all(len(h["texts"]) == 3 for h in described["heads"])
    assert "L1.H2" in result.output

    result = runner.invoke(app, ["ccs", "--model", str(setup / "model"), "--descriptions",
                                 str(out / "descriptions.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    scored = json.loads((out / "ccs.json").read_text())
    assert [h["head"] for h in scored["heads"]] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert all(0 <= h["ccs"] <= 3 and h["ccs"] == sum(h["consistent"]) for h in scored["heads"])
    assert scored["judges"] == ["clip"] and "threshold" in scored["meta"]["calibration"]["clip"]
    assert (out / "ccs_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_clear_line(setup, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["ccs", "--model", str(setup / "model"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "give --data" in str(result.exception)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["describe", "--model", str(setup / "model"), "--data", str(empty)])
    assert "found 0 images" in str(result.exception)
