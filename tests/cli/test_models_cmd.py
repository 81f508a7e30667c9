"""`clipheads info` and `clipheads mask` on a tiny saved model."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipheads import HeadMask
from clipheads.cli import app
from clipheads.errors import ModelLoadError
from clipheads.models.random_init import random_hf_clip, save_hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_hf(random_hf_clip("tiny", seed=3), tmp_path_factory.mktemp("model")))


def test_info_names_the_heads(model_dir):
    result = CliRunner().invoke(app, ["info", "--model", model_dir])
    assert result.exit_code == 0, result.output
    assert "L0.H0 .. L1.H3" in result.output


def test_mask_with_means_round_trips(model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 40), colour).save(images / f"{i}.png")
    out = tmp_path / "mask.json"
    result = CliRunner().invoke(app, ["mask", "--model", model_dir, "--heads", "L1.H2", "--layers", "0",
                                      "--means-from", str(images), "-o", str(out)])
    assert result.exit_code == 0, result.output
    mask = HeadMask.load(out)
    assert mask.ablated == ["L0.H0", "L0.H1", "L0.H2", "L0.H3", "L1.H2"]
    assert set(json.loads(out.read_text())["means"]) == set(mask.ablated)
    assert json.loads(out.read_text())["means_kind"] == "per-position" and mask.means.dim() == 4
    result = CliRunner().invoke(app, ["mask", "--model", model_dir, "--heads", "L1.H2", "--means-from", str(images),
                                      "--means", "pooled", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["means_kind"] == "pooled" and HeadMask.load(out).means.dim() == 3
    result = CliRunner().invoke(app, ["mask", "--model", model_dir, "--heads", "L1.H2", "--means-from", str(images),
                                      "--means", "tokens", "-o", str(tmp_path / "other.json")])
    assert result.exit_code != 0 and "unknown kind of head means 'tokens'" in str(result.exception)
    assert not (tmp_path / "other.json").exists()


def test_mask_refuses_a_head_that_does_not_exist(model_dir, tmp_path):
    from clipheads.cli import main  # noqa: F401 - the same app, run as the console script would

    result = CliRunner().invoke(app, ["mask", "--model", model_dir, "--heads", "L9.H0", "-o", str(tmp_path / "m")])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception)


def test_info_takes_clip_benchmark_spelling():
    result = CliRunner().invoke(app, ["info", "--model", "ClipHeads-Tiny-ViT"])
    assert result.exit_code == 0, result.output
    assert "open_clip" in result.output and "L0.H0 .. L1.H3" in result.output
    result = CliRunner().invoke(app, ["info", "--model", "ClipHeads-Tiny-ViT", "--pretrained", "no-such-tag"])
    assert isinstance(result.exception, ModelLoadError) and "no-such-tag" in str(result.exception)
