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
    result = CliRunner().invoke(app, [*base, "--task", "captioning"])  # a usage error while parsing (exit 2)
    assert result.exit_code == 2 and "unknown task 'captioning'" in result.output


@pytest.mark.parametrize("task,alias", [("retrieval", "zeroshot_retrieval"), ("zeroshot", "zeroshot_classification")])
def test_eval_writes_a_result_clip_benchmark_build_accepts(model_dir: Path, data: Path, task: str, alias: str):
    import argparse
    import csv

    from clip_benchmark.cli import main_build

    (data / "labels.csv").write_text("image,label\nimg/0.png,red\nimg/1.png,green\nimg/2.png,blue\n")
    source = data / ("dataset_coco.json" if task == "retrieval" else "labels.csv")
    out = data / f"{task}.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", alias, "--data", str(source),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    ours = json.loads(out.read_text())
    assert ours["task"] == task  # the alias names the same task
    written = json.loads((data / f"{task}.clip_benchmark.json").read_text())
    assert set(written) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert written["task"] == alias and written["model"] == str(model_dir) and written["language"] == "en"
    assert written["metrics"] == ours["metrics"]
    main_build(argparse.Namespace(files=[str(data / f"{task}.clip_benchmark.json")], output=str(data / "b.csv")))
    with open(data / "b.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["task"] == alias and rows[0]["dataset"] == written["dataset"]
    assert rows[0]["model_fullname"] == f"{model_dir} "
    key = "image_retrieval_recall@5" if task == "retrieval" else "acc1"
    assert float(rows[0][key]) == ours["metrics"][key]
    if task == "zeroshot":
        assert written["metrics"]["acc5"] is None and rows[0]["acc5"] == ""  # NaN below 5 classes, as JSON null


def test_model_and_pretrained_as_clip_benchmark_names_them():
    from clipheads.eval.benchmark import model_and_pretrained

    assert model_and_pretrained("open_clip:ViT-B-32/laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert model_and_pretrained("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", "")


def test_clip_benchmark_result_names_a_pretrained_given_apart_and_wds_datasets():
    """--model ViT-B-32 --pretrained TAG wrote "pretrained": "" (the tag came through load options); a wds_* shard
    folder is clip_benchmark's wds/... dataset."""
    from clipheads.eval.benchmark import clip_benchmark_result
    from clipheads.models import load_options

    with load_options(pretrained="laion2b_s34b_b79k"):
        result = clip_benchmark_result("zeroshot", "wds_vtab-cifar10", "ViT-B-32", {"acc1": 0.5})
    assert (result["model"], result["pretrained"], result["dataset"]) == ("ViT-B-32", "laion2b_s34b_b79k",
                                                                          "wds/vtab/cifar10")
    assert clip_benchmark_result("retrieval", "flickr30k", "bundled", {})["dataset"] == "flickr30k"


def test_eval_reads_a_parquet_file_through_workers(model_dir: Path, data: Path, monkeypatch):
    """Images stay in the parquet file; DataLoader workers read them by reference."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", data / "hf-cache")

    rows = json.loads((data / "dataset_coco.json").read_text())["images"][:3]
    features = datasets.Features({"image": datasets.Image(), "sentences": datasets.Sequence(datasets.Value("string"))})
    table = datasets.Dataset.from_dict({"image": [{"bytes": (data / "img" / r["filename"]).read_bytes(), "path": None}
                                                  for r in rows],
                                        "sentences": [[s["raw"] for s in r["sentences"]] for r in rows]},
                                       features=features)
    table.to_parquet(data / "flickr.parquet")
    runs = {}
    for name, source in (("karpathy", data / "dataset_coco.json"), ("parquet", data / "flickr.parquet")):
        result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", "retrieval", "--data",
                                          str(source), "--num-workers", "1", "--out", str(data / f"{name}.json")])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads((data / f"{name}.json").read_text())
    assert runs["parquet"]["dataset"]["format"] == "hf" and runs["parquet"]["dataset"]["n_texts"] == 6
    assert runs["parquet"]["metrics"] == runs["karpathy"]["metrics"]
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", "retrieval", "--data",
                                      str(data / "flickr.parquet"), "--text-column", "words"])
    assert "has no column 'words' (columns: image, sentences)" in str(result.exception)


def test_eval_by_clip_benchmark_dataset_name(model_dir: Path, data: Path):
    root = data / "img"
    for i in range(3):  # clip_benchmark's Flickr reader splits lines at ".jpg,"
        (root / f"{i}.jpg").write_bytes((root / f"{i}.png").read_bytes())
    (root / "flickr30k_test_karpathy.txt").write_text("image,caption\n0.jpg,a red square\n1.jpg,a green square\n"
                                                      "2.jpg,a blue square\n")
    out = data / "named.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", "zeroshot_retrieval",
                                      "--dataset", "flickr30k", "--dataset-root", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["dataset"]["n_images"] == 3 and report["dataset"]["format"] == "clip_benchmark"
    assert json.loads((data / "named.clip_benchmark.json").read_text())["dataset"] == "flickr30k"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", "retrieval"])
    assert str(result.exception) == "give --data PATH, or --dataset NAME --dataset-root DIR (clip_benchmark)"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", "retrieval", "--dataset",
                                      "flickr8k", "--dataset-root", str(root)])
    assert "clip_benchmark expects 'flickr8k' (split 'test') at" in str(result.exception)


@pytest.mark.parametrize("split", ["none", "all"])
def test_eval_split_none_uses_the_whole_file_as_scan_does(model_dir: Path, data: Path, split: str):
    out = data / f"{split}.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--task", "retrieval", "--data",
                                      str(data / "dataset_coco.json"),
                                      "--split", split, "--batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["dataset"]["n_images"] == 4


def test_eval_bias_k_above_an_attributes_images_is_refused_in_one_line(model_dir: Path, data: Path, run_main):
    """MaxSkew@K over 2 images of one attribute with K = 5 would silently be MaxSkew@2 under the name @5: refused
    before the model is loaded; K = 2 runs and names itself."""
    images = [{"image": f"img/{i}.png", "group": f"g{i // 2}", "attribute": "colour" if i < 2 else "hue",
               "value": ["a", "b"][i % 2]} for i in range(4)]
    (data / "bias.json").write_text(json.dumps({"queries": ["a photo"], "images": images}))
    args = ["eval", "--model", model_dir, "--task", "bias", "--data", data / "bias.json", "--out", data / "b.json"]
    code, _, err = run_main(*args, "--skew-k", 2)
    assert code == 0, err
    assert set(json.loads((data / "b.json").read_text())["metrics"]) == {
        "max_skew@2", "max_skew@2/colour", "max_skew@2/hue"}
    (data / "b.json").unlink()
    code, _, err = run_main(*args, "--skew-k", 5, forbid_load=True)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "MaxSkew@5 ranks the 2 images of attribute" in lines[0], err
    assert "--skew-k 2" in lines[0] and not (data / "b.json").exists()
    code, _, err = run_main(*args, "--k", 3, forbid_load=True)  # the old spelling too
    assert code == 2 and "MaxSkew@3" in err
