"""The CLIP shipped with clipheads: loads offline, matches its checksums, reproduces its model card's metrics."""

from __future__ import annotations

import json

import pytest

import clipheads
from clipheads.models import bundled_model_path
from clipheads.world.evaluate import evaluate_world
from clipheads.world.train import CHECK_IMAGES, verify_checksums

BUNDLED = bundled_model_path()


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((BUNDLED / "training.json").read_text())


def test_bundled_checkpoint_is_complete_and_small():
    files = {p.name: p.stat().st_size for p in BUNDLED.iterdir() if p.is_file()}
    assert {"model.safetensors", "config.json", "README.md", "checksums.json", "training.json",
            "preprocessor_config.json", "tokenizer.json"} <= set(files)
    assert sum(files.values()) <= 25 * 2**20
    assert verify_checksums(BUNDLED) == []


def test_bundled_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backend = clipheads.load("bundled")
    assert (backend.n_layers, backend.n_heads, backend.image_size) == (6, 8, 64)
    assert backend.name == "bundled"


def test_model_card_states_how_to_reproduce(record):
    card = (BUNDLED / "README.md").read_text()
    assert "clipheads world make --out world --seed 0" in card
    assert f"--steps {record['config']['steps']}" in card
    assert f"{record['seconds'] / 60:.1f} min" in card


def test_bundled_reproduces_its_model_card_metrics(record):
    backend = clipheads.load("bundled")
    results = evaluate_world(backend, seed=record["world_seed"], n_per_split=CHECK_IMAGES)
    for split, expected in record["check_metrics"].items():
        assert results[split].n_images == expected["n_images"]
        assert results[split].mean_recall == pytest.approx(expected["mean_recall"], abs=0.5)
        assert results[split].shape_accuracy == pytest.approx(expected["shape_accuracy"], abs=0.5)
