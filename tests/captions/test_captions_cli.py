"""``clipheads captioner train`` / ``generate`` on a tiny Karpathy split and a tiny saved CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from clipheads.cli import captions_cmd
from clipheads.errors import DataError
from clipheads.models.random_init import save_hf, tiny_model

CAPTIONS = {"red.png": ("a red square", (220, 30, 30)), "blue.png": ("a blue circle", (30, 30, 220)),
            "green.png": ("two green trees", (30, 200, 30))}


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    captions_cmd.register(app)
    return app


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i, (name, (caption, colour)) in enumerate(CAPTIONS.items()):
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / name)
        images.append({"filename": name, "filepath": "images", "split": "train", "imgid": i,
                       "sentences": [{"raw": caption}]})
    images.append({"filename": "red.png", "filepath": "images", "split": "test", "imgid": 9,
                   "sentences": [{"raw": "held out"}]})
    (root / "karpathy.json").write_text(json.dumps({"dataset": "tiny", "images": images}))
    save_hf(tiny_model("hf"), root / "clip")
    return root


def test_train_then_generate(app, world, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["captioner", "train", "--data", str(world / "karpathy.json"), "--model",
                                 str(world / "clip"), "--out", str(tmp_path / "cap"), "--epochs", "80",
                                 "--batch-size", "3", "--lr", "1e-2", "--prefix-length", "2", "--width", "32",
                                 "--layers", "1"])
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "cap" / "train.json").read_text())
    assert train["n_images"] == 3 and train["n_pairs"] == 3
    assert train["epoch_losses"][-1] < 0.2 * train["epoch_losses"][0]

    result = runner.invoke(app, ["captioner", "generate", "--captioner", str(tmp_path / "cap"), "--images",
                                 str(world / "images"), "--out", str(tmp_path / "captions.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "captions.json").read_text())
    produced = {item["image"].rsplit("/", 1)[-1]: item["caption"] for item in written["captions"]}
    assert produced == {name: caption for name, (caption, _) in CAPTIONS.items()}

    result = runner.invoke(app, ["captioner", "generate", "--captioner", str(tmp_path / "cap"), "--images",
                                 str(world / "images" / "red.png"), "--prefix", "a photo of a", "--beams", "2",
                                 "--out", str(tmp_path / "prefixed.json")])
    assert result.exit_code == 0, result.output
    caption = json.loads((tmp_path / "prefixed.json").read_text())["captions"][0]["caption"]
    assert caption.startswith("a photo of a")


def test_karpathy_reader(world):
    files, captions, index = captions_cmd.read_karpathy_pairs(world / "karpathy.json", "train")
    assert [f.name for f in files] == list(CAPTIONS) and index == [0, 1, 2]
    assert captions == [caption for caption, _ in CAPTIONS.values()]
    with pytest.raises(DataError, match="no captioned images in split 'val'"):
        captions_cmd.read_karpathy_pairs(world / "karpathy.json", "val")
    with pytest.raises(DataError, match="cannot read"):
        captions_cmd.read_karpathy_pairs(world / "missing.json", "train")
