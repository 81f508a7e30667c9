"""``clipheads finetune`` on a tiny model and a tiny Karpathy JSON: one method, ``--compare``, and its refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipheads.cli import app
from clipheads.errors import ClipHeadsError
from clipheads.models.random_init import save_hf, tiny_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220), "yellow": (230, 220, 30),
           "black": (10, 10, 10), "white": (245, 245, 245), "pink": (240, 120, 180), "grey": (128, 128, 128)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_hf(tiny_model("hf", seed=2), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    images = []
    for i, (word, colour) in enumerate(list(COLOURS.items()) * 2):
        Image.new("RGB", (32, 32), colour).save(root / "img" / f"{i}.png")
        split = "train" if i < 8 else ("val" if i < 12 else "test")
        images.append({"filename": f"{i}.png", "filepath": "img", "split": split,
                       "sentences": [{"raw": f"a {word} square"}, {"raw": f"a {word} circle"}]})
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return root / "dataset_coco.json"


def _args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["finetune", "--model", str(model_dir), "--data", str(data), "--epochs", "2", "--batch-size", "4",
            "--out", str(out)]


def test_finetune_lora_writes_metrics_and_a_peft_checkpoint(model_dir: Path, data: Path, tmp_path: Path):
    result = CliRunner().invoke(app, [*_args(model_dir, data, tmp_path), "--method", "lora", "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert "lora-r2" in result.output and "held-out mean-R on dataset_coco.json:test" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "lora-r2" and metrics["n_train_images"] == 8 and metrics["n_train_texts"] == 16
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["heldout"]["split"] == "dataset_coco.json:test"
    assert metrics["validation"]["finetuned"] == metrics["epochs"][-1]["val_mean_recall"]
    assert (Path(metrics["checkpoint"]) / "adapter_config.json").exists()
    assert (tmp_path / "epoch_curves.png").stat().st_size > 0


def test_finetune_compare_writes_table_json_and_plots(model_dir: Path, data: Path, tmp_path: Path):
    result = CliRunner().invoke(app, [*_args(model_dir, data, tmp_path), "--compare", "--methods",
                                      "vanilla,aat-bp,lora-r2,full", "--full-lr", "1e-3"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["vanilla", "aat-bp", "lora-r2", "full"]
    assert report["rows"][1]["trainable_params"] == 8 and report["rows"][1]["params_unit"] == "bits"
    assert report["command"] == "finetune --compare" and report["versions"]["torch"]
    assert "| aat-bp | 8 bits |" in (tmp_path / "comparison.md").read_text()
    for name in ("recall_vs_params.png", "recall_vs_time.png", "epoch_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "checkpoints" / "aat-bp" / "mask.json").exists()
    assert (tmp_path / "checkpoints" / "full" / "config.json").exists()


def test_finetune_refuses_training_on_the_held_out_split(model_dir: Path, data: Path, tmp_path: Path):
    args = [*_args(model_dir, data, tmp_path), "--train-split", "test"]
    failed = CliRunner().invoke(app, args)
    assert isinstance(failed.exception, ClipHeadsError) and "--allow-same-split" in str(failed.exception)
    assert not (tmp_path / "metrics.json").exists()
    failed = CliRunner().invoke(app, [*_args(model_dir, data, tmp_path), "--compare", "--methods", "vanilla,lora"])
    assert isinstance(failed.exception, ClipHeadsError) and "lora-rN" in str(failed.exception)


def test_finetune_help_explains_methods():
    result = CliRunner().invoke(app, ["finetune", "--help"])
    assert result.exit_code == 0
    assert "--compare" in result.output and "lora" in result.output and "held-out" in result.output.lower()


def test_finetune_without_peft_is_one_line_before_any_work(model_dir: Path, data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed: `import peft` raises ImportError
    failed = CliRunner().invoke(app, _args(model_dir, data, tmp_path / "out"))
    assert isinstance(failed.exception, ClipHeadsError), failed.output
    assert "pip install peft" in str(failed.exception) and "\n" not in str(failed.exception)
    assert not (tmp_path / "out").exists()
    ok = CliRunner().invoke(app, [*_args(model_dir, data, tmp_path / "full"), "--method", "full", "--epochs", "1"])
    assert ok.exit_code == 0, ok.output  # full fine-tuning does not need peft


def test_peft_is_a_base_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("peft") for dep in project["dependencies"])
    assert project["optional-dependencies"]["peft"]  # the old extra still installs
