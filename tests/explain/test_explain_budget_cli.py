"""``describe`` and ``ccs`` under ``--memory-budget``: the plan is printed and recorded, streamed descriptions equal
the all-in-memory ones, and a budget too small for one image is one line before any image is read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipheads.models.random_init import random_hf_clip, save_hf


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """A tiny saved model and 120 images: enough for their head contributions to outweigh the heads' moments."""
    from PIL import Image

    root = tmp_path_factory.mktemp("explain_budget")
    save_hf(random_hf_clip("tiny"), root / "model")
    rng = np.random.default_rng(1)
    (root / "images").mkdir()
    for i in range(120):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.png")
    return root


def test_describe_streams_under_a_budget_with_the_same_descriptions(many_images, tmp_path, run_main):
    base = ["describe", "--model", many_images / "model", "--data", many_images / "images", "--k", 3, "--layers", 1,
            "--batch-size", 16]
    code, out, err = run_main(*base, "--out", tmp_path / "full")
    assert code == 0, err
    assert "memory plan: head contributions of 120 images in memory" in " ".join(out.split())
    full = json.loads((tmp_path / "full" / "descriptions.json").read_text())
    code, out, err = run_main(*base, "--memory-budget", "200KiB", "--out", tmp_path / "streamed")
    assert code == 0, err
    said = " ".join(out.split())
    assert "memory plan: head contributions streamed in chunks of 8 images (second moments)" in said, said  # halved
    assert "budget 200 KiB" in said
    streamed = json.loads((tmp_path / "streamed" / "descriptions.json").read_text())
    assert streamed["meta"]["memory_plan"].startswith("head contributions streamed")
    assert [h["texts"] for h in streamed["heads"]] == [h["texts"] for h in full["heads"]]
    for a, b in zip(streamed["heads"], full["heads"], strict=True):
        assert a["explained"] == pytest.approx(b["explained"], abs=2e-6) and a["rank"] == b["rank"]


@pytest.mark.parametrize("command", ["describe", "ccs"])
def test_a_budget_too_small_for_one_image_is_one_line(many_images, tmp_path, run_main, command):
    code, _, err = run_main(command, "--model", many_images / "model", "--data", many_images / "images",
                            "--memory-budget", "1KiB", "--out", tmp_path / "small")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "memory budget 1 KiB is too small for the head explanations" in err
    assert not (tmp_path / "small" / "descriptions.json").exists()
    code, _, err = run_main(command, "--model", many_images / "model", "--data", many_images / "images",
                            "--memory-budget", "lots", "--out", tmp_path / "bad", forbid_load=True)
    assert code == 2 and "not a memory size: 'lots'" in err
