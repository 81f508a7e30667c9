"""Training a world CLIP: the loss goes down, runs are deterministic, the checkpoint loads and is documented."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import clipheads
from clipheads.cli import app
from clipheads.errors import ClipHeadsError
from clipheads.world import WorldSizes, make_world
from clipheads.world.train import TrainConfig, train_clip, verify_checksums

SIZES = WorldSizes(train=64, val_ood=16, test_ood=16, test_iid=16, test_anti=16, compositional=0, counterfactual=0)
CONFIG = TrainConfig(preset="tiny", steps=40, batch_size=16, lr=3e-3, eval_images=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), seed=0, sizes=SIZES, progress=False)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    return train_clip(world.root, tmp_path_factory.mktemp("ckpt"), CONFIG, progress=False)


def test_short_training_lowers_the_loss(trained):
    assert len(trained.losses) == CONFIG.steps
    assert trained.final_loss < trained.first_loss - 0.3


def test_training_is_deterministic_for_a_seed(world, trained, tmp_path):
    again = train_clip(world.root, tmp_path / "again", CONFIG, progress=False, evaluate=False)
    assert again.losses == trained.losses


def test_checkpoint_loads_and_is_documented(trained):
    backend = clipheads.load(str(trained.out_dir))
    assert (backend.n_layers, backend.n_heads, backend.image_size) == (2, 4, 64)
    assert backend.tokenize(["a small red circle at the top left"])["input_ids"].shape[1] == 10
    assert verify_checksums(trained.out_dir) == []
    checksums = json.loads((trained.out_dir / "checksums.json").read_text())
    assert {"model.safetensors", "config.json", "README.md", "training.json"} <= set(checksums)
    card = (trained.out_dir / "README.md").read_text()
    assert "clipheads world train --data" in card and "| val_ood |" in card
    record = json.loads((trained.out_dir / "training.json").read_text())
    assert set(record["metrics"]) == {"val_ood", "test_ood", "test_iid", "test_anti"}
    assert 0 <= record["metrics"]["val_ood"]["mean_recall"] <= 100


def test_checksums_catch_a_changed_file(trained, tmp_path):
    import shutil

    copy = shutil.copytree(trained.out_dir, tmp_path / "copy")
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert verify_checksums(copy) == ["config.json"]


def test_bad_options_are_clear_errors(world, tmp_path):
    with pytest.raises(ClipHeadsError, match="unknown model config"):
        train_clip(world.root, tmp_path, TrainConfig(preset="huge"), progress=False)
    with pytest.raises(ClipHeadsError, match="precision"):
        train_clip(world.root, tmp_path, TrainConfig(precision="int4"), progress=False)


def test_cli_make_and_train(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["world", "make", "--out", str(tmp_path / "w"), "--n-train", "32", "--n-val", "8",
                                 "--n-test", "8", "--n-pairs", "2", "--n-groups", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "retrieval.json").exists() and (tmp_path / "w" / "compositional.json").exists()
    result = runner.invoke(app, ["world", "train", "--data", str(tmp_path / "w"), "--out", str(tmp_path / "ck"),
                                 "--config", "tiny", "--steps", "3", "--batch-size", "8", "--eval-images", "8"])
    assert result.exit_code == 0, result.output
    assert "val_ood" in result.output
    assert clipheads.load(str(tmp_path / "ck")).n_layers == 2


def test_model_card_can_be_rewritten_from_training_json(trained, tmp_path):
    import shutil

    from clipheads.world.train import TrainResult, write_model_card

    copy = shutil.copytree(trained.out_dir, tmp_path / "card")
    restored = TrainResult.from_dict(json.loads((copy / "training.json").read_text()))
    assert restored.losses == trained.losses
    assert {k: v.mean_recall for k, v in restored.metrics.items()} == {k: v.mean_recall
                                                                      for k, v in trained.metrics.items()}
    write_model_card(copy, restored, command=None)
    card, original = (copy / "README.md").read_text(), (trained.out_dir / "README.md").read_text()
    assert card == original


def test_gpu_preset_has_vit_b16_depth_and_heads():
    from clipheads.world.train import build_world_clip

    backend = build_world_clip("gpu")
    assert (backend.n_layers, backend.n_heads, backend.image_size) == (12, 12, 64)
