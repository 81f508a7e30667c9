"""A full ``clipheads eval`` run on a tiny model saved to a folder, and its one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import clipheads
from clipheads.cli import app
from clipheads.errors import DataError
from clipheads.models.random_init import save_hf, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_hf(tiny_model("hf"), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    words = ["red", "green", "blue", "yellow"]
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "img" / f"{i}.png")
    images = [{"filename": f"{i}.png", "filepath": "img", "split": "test" if i < 3 else "train",
               "sentences": [{"raw": f"a {w} square"}, {"raw": f"a {w} circle"}]} for i, w in enumerate(words)]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return tmp_path


def test_eval_retrieval_with_mask_writes_json(model_dir: Path, data: Path):
    mask = clipheads.HeadMask.from_heads("L0.H1,L1.H3", (2, 4))
    mask.save(data / "mask.json")
    out = data / "out" / "result.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", "retrieval", "--data",
                                      str(data / "dataset_coco.json"), "--split", "test", "--mask",
                                      str(data / "mask.json"), "--op", "scale", "--alpha", "0.5", "--batch-size",
                                      "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean_recall" in result.output and "2 heads ablated (scale)" in result.output
    report = json.loads(out.read_text())
    assert report["task"] == "retrieval" and report["model"] == str(model_dir)
    assert report["mask"]["ablated"] == ["L0.H1", "L1.H3"]
    assert report["operator"] == {"name": "scale", "alpha": 0.5}
    assert report["dataset"]["split"] == "test" and report["dataset"]["n_images"] == 3
    assert set(report["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} | {
        "mean_recall"}
    assert report["n_skipped"] == 0 and report["wall_time_s"] > 0
    assert report["versions"]["torch"] and report["versions"]["clipheads"]
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary file left behind


def test_eval_skip_bad_counts_and_other_tasks(model_dir: Path, data: Path):
    (data / "img" / "1.png").write_bytes(b"broken")
    args = ["eval", "--model", str(model_dir), "--task", "retrieval", "--data", str(data / "dataset_coco.json"),
            "--out", str(data / "r.json")]
    failed = CliRunner().invoke(app, args)
    assert isinstance(failed.exception, DataError) and "1.png" in str(failed.exception)
    assert "\n" not in str(failed.exception)
    result = CliRunner().invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert json.loads((data / "r.json").read_text())["skipped_images"] == [str(data / "img" / "1.png")]
    assert "1 images skipped" in result.output

    (data / "labels.csv").write_text("image,label\nimg/0.png,red\nimg/2.png,blue\nimg/3.png,yellow\n")
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", "zeroshot", "--data",
                                      str(data / "labels.csv"), "--per-class", "--out", str(data / "z.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((data / "z.json").read_text())
    assert set(report["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert set(report["details"]["per_class"]) == {"red", "blue", "yellow"}


def test_eval_refuses_empty_split_and_unknown_task(model_dir: Path, data: Path):
    base = ["eval", "--model", str(model_dir), "--data", str(data / "dataset_coco.json")]
    result = CliRunner().invoke(app, [*base, "--task", "retrieval", "--split", "val"])
    assert isinstance(result.exception, DataError)
    assert "has no images in split 'val' (splits present: test, train)" in str(result.exception)
    result = CliRunner().invoke(app, [*base, "--task", "captioning"])
    assert "unknown --task 'captioning'" in str(result.exception)
