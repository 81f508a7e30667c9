"""Layer-wise captioning under ``--memory-budget``: the search split's and the captioner's pixels kept as exact
uint8 codes give the same captions and scores as float pixels."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from clipheads.captions import LayerwiseCaptionConfig, LayerwiseCaptioning, caption_vocabulary
from clipheads.captions.encoder_decoder import random_vision_encoder_decoder
from clipheads.cli import app
from clipheads.models.random_init import save_hf, tiny_model, word_tokenizer
from clipheads.search.pixels import load_pixel_store
from clipheads.search.tasks import load_pixels

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "black": (10, 10, 10)}


def _world(root):
    save_hf(tiny_model("hf", seed=0), root / "clip")
    rng = np.random.default_rng(0)
    selection = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{name}.png")
        selection.append({"image": f"{name}.png", "candidates": [f"a {c} square" for c in COLOURS], "answer": i})
    (root / "selection.json").write_text(json.dumps(selection))
    return [root / f"{name}.png" for name in COLOURS]


def test_stored_pixels_give_the_same_captions(tmp_path):
    paths = _world(tmp_path)
    clip = tiny_model("hf", seed=0)
    captioner = random_vision_encoder_decoder(word_tokenizer(caption_vocabulary(
        [f"a {c} square on the left" for c in COLOURS])), n_layers=2, seed=0)
    config = LayerwiseCaptionConfig(prefix_from_selection=False, max_new_tokens=3, batch_size=3)
    floats = load_pixels(clip, paths)[0], load_pixels(captioner.backend, paths)[0]
    expected = LayerwiseCaptioning(captioner, clip, floats[0], config, floats[1])([[], [1]])
    for storage in ("uint8", "disk"):
        stores = [load_pixel_store(model, paths, storage)[0] for model in (clip, captioner.backend)]
        assert all(s.storage == storage for s in stores) and torch.equal(stores[1].float(), floats[1])
        got = LayerwiseCaptioning(captioner, clip, stores[0], config, stores[1])([[], [1]])
        assert got == expected, storage


def test_layers_generate_cli_under_a_budget_keeps_uint8_pixels(tmp_path):
    _world(tmp_path)
    random_vision_encoder_decoder(word_tokenizer(caption_vocabulary(
        [f"a {c} square on the left" for c in COLOURS])), n_layers=2, seed=0).save(tmp_path / "ved")
    common = ["layers", "--model", tmp_path / "clip", "--data", tmp_path / "selection.json", "--ranges", "1",
              "--generate", "--captioner", tmp_path / "ved", "--max-new-tokens", 3]
    runner = CliRunner()
    full = runner.invoke(app, [str(a) for a in [*common, "--out", tmp_path / "full"]])
    assert full.exit_code == 0, full.output
    values = 4 * 3 * 32 * 32  # the split's pixels: uint8 once they would take more than a quarter of the budget
    small = runner.invoke(app, [str(a) for a in [*common, "--memory-budget", 16 * values - 4, "--out",
                                                 tmp_path / "small"]])
    assert small.exit_code == 0, small.output
    assert "pixels uint8 exact codes" in " ".join(small.output.split())
    (full_group,), (small_group,) = [json.loads((tmp_path / run / "layers.json").read_text())["groups"]
                                     for run in ("full", "small")]
    assert small_group["generation"] == full_group["generation"]  # the captioner's pixels: the same captions
    assert small_group["details"]["selected"] == full_group["details"]["selected"]
    # the layer scan's logits come from the search cache, planned in smaller chunks under this budget: the CPU's
    # matmul kernels for other row counts change the last bits
    torch.testing.assert_close(torch.tensor(small_group["details"]["logits"]),
                               torch.tensor(full_group["details"]["logits"]), atol=1e-5, rtol=0)
