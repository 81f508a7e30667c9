"""``describe``, ``ccs``, ``prune`` and ``mask --means-from`` take the ``--skip-bad`` their image errors suggest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from clipheads import HeadMask
from clipheads.cli import app
from clipheads.errors import DataError
from clipheads.models.random_init import random_hf_clip, save_hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved model and a folder of 6 images, one of them corrupt."""
    root = tmp_path_factory.mktemp("skip_bad")
    save_hf(random_hf_clip("tiny", seed=3), root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "images" / "3.png").write_bytes(b"not a png")
    return root


def test_every_command_that_reads_images_for_these_steps_has_skip_bad():
    commands = typer.main.get_command(app).commands
    for name in ("describe", "ccs", "prune", "mask", "eval", "scan", "layers", "search", "finetune"):
        assert "--skip-bad" in [o for p in commands[name].params for o in p.opts], name


def test_describe_suggests_skip_bad_and_skip_bad_works(setup):
    common = ["describe", "--model", str(setup / "model"), "--data", str(setup / "images"), "--k", "2", "--layers",
              "1", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*common, "--out", str(setup / "strict")])
    assert isinstance(result.exception, DataError) and "--skip-bad" in str(result.exception)
    assert "3.png" in str(result.exception)
    result = CliRunner().invoke(app, [*common, "--out", str(setup / "skipping"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    described = json.loads((setup / "skipping" / "descriptions.json").read_text())
    assert described["n_images"] == 5
    assert [p.rsplit("/", 1)[-1] for p in described["meta"]["skipped_images"]] == ["3.png"]


def test_ccs_with_skip_bad(setup):
    result = CliRunner().invoke(app, ["ccs", "--model", str(setup / "model"), "--data", str(setup / "images"),
                                      "--k", "2", "--layers", "1", "--judge", "clip", "--skip-bad",
                                      "--out", str(setup / "ccs")])
    assert result.exit_code == 0, result.output
    assert json.loads((setup / "ccs" / "descriptions.json").read_text())["n_images"] == 5


def test_mask_means_from_suggests_skip_bad_and_skip_bad_works(setup):
    common = ["mask", "--model", str(setup / "model"), "--heads", "L1.H2", "--means-from", str(setup / "images")]
    result = CliRunner().invoke(app, [*common, "-o", str(setup / "strict.json")])
    assert isinstance(result.exception, DataError) and "--skip-bad" in str(result.exception)
    assert not (setup / "strict.json").exists()
    result = CliRunner().invoke(app, [*common, "-o", str(setup / "mask.json"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    mask = HeadMask.load(setup / "mask.json")
    assert mask.means is not None and mask.meta["skipped_images"][0].endswith("3.png")


def test_skip_bad_with_no_readable_image_is_one_line(setup, tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"y")
    result = CliRunner().invoke(app, ["mask", "--model", str(setup / "model"), "--heads", "L1.H2", "--means-from",
                                      str(tmp_path), "--skip-bad", "-o", str(tmp_path / "m.json")])
    assert isinstance(result.exception, DataError) and "none of the 2 images" in str(result.exception)
