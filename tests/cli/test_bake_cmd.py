"""``clipheads bake``: fold a mask into the weights, save the model with everything ``--model DIR`` needs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import clipheads
from clipheads.cli import app
from clipheads.errors import ClipHeadsError
from clipheads.models.random_init import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return clipheads.save(tiny_model("hf", seed=5), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def mask_file(model_dir, tmp_path):
    means = torch.randn(2, 4, 16)
    mask = clipheads.HeadMask.from_heads("L0.H3,L1.H0", clipheads.load(model_dir))
    mask.means = means
    return mask.save(tmp_path / "mask.json")


@pytest.mark.parametrize(("op", "extra"), [("zero", []), ("mean", []), ("scale", ["--alpha", "0.5"])])
def test_bake_writes_a_model_that_loads_and_equals_the_python_bake(model_dir, mask_file, tmp_path, op, extra):
    out = tmp_path / "baked"
    result = CliRunner().invoke(app, ["bake", "--model", str(model_dir), "--mask", str(mask_file), "--op", op,
                                      *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "L0.H3, L1.H0" in result.output and str(out) in result.output
    source = clipheads.load(model_dir)
    expected = clipheads.as_backend(clipheads.bake(source, clipheads.HeadMask.load(mask_file, source), op=op,
                                                   alpha=0.5 if op == "scale" else None))
    loaded = clipheads.load(out)
    image = Image.new("RGB", (40, 40), (200, 40, 40))
    with torch.inference_mode():
        assert torch.equal(loaded.encode_image(image), expected.encode_image(image))
        assert torch.equal(loaded.encode_text(["a red square"]), expected.encode_text(["a red square"]))
    info = CliRunner().invoke(app, ["info", "--model", str(out)])
    assert info.exit_code == 0 and "L0.H0 .. L1.H3" in info.output


@pytest.mark.parametrize(("args", "message"), [
    (["--op", "identity"], "cannot be folded"),
    (["--op", "zero", "--alpha", "0.5"], "--alpha is the factor of --op scale"),
])
def test_bake_refuses_bad_arguments_before_loading(model_dir, mask_file, tmp_path, args, message):
    base = ["bake", "--model", str(model_dir), "--mask", str(mask_file), "--out", str(tmp_path / "o")]
    failed = CliRunner().invoke(app, [*base, *args])
    if isinstance(failed.exception, SystemExit):  # refused while parsing (a missing --mask): click's usage error
        assert failed.exit_code == 2 and message in failed.output
    else:
        assert isinstance(failed.exception, ClipHeadsError) and message in str(failed.exception)
    assert not (tmp_path / "o").exists()


def test_bake_refuses_a_missing_mask_while_parsing(model_dir, tmp_path):
    """--mask is checked like every other input path (exists=True): a usage error naming the option, exit code 2."""
    failed = CliRunner().invoke(app, ["bake", "--model", str(model_dir), "--mask", str(tmp_path / "missing.json"),
                                      "--out", str(tmp_path / "o")])
    assert failed.exit_code == 2 and "--mask" in failed.output and "does not exist" in failed.output
    assert not (tmp_path / "o").exists()


def test_bake_refuses_a_full_folder_and_a_mask_of_another_model(model_dir, mask_file, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    failed = CliRunner().invoke(app, ["bake", "--model", str(model_dir), "--mask", str(mask_file), "--out", str(full)])
    assert isinstance(failed.exception, ClipHeadsError) and "holds other files" in str(failed.exception)
    assert (full / "notes.txt").read_text() == "mine"
    args = ["bake", "--model", str(model_dir), "--mask", str(mask_file), "--out", str(tmp_path / "again")]
    assert CliRunner().invoke(app, args).exit_code == 0
    failed = CliRunner().invoke(app, args)
    assert isinstance(failed.exception, ClipHeadsError) and "--overwrite" in str(failed.exception)
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    failed = CliRunner().invoke(app, ["bake", "--mask", str(mask_file), "--out", str(tmp_path / "b")])  # bundled
    assert isinstance(failed.exception, clipheads.MaskError) and "6 layers x 8 heads" in str(failed.exception)
    assert not (tmp_path / "b").exists()
