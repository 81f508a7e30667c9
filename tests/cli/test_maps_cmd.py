"""``clipheads maps``: PNG overlays of attention (with and without a mask) and spatial maps."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image


def test_maps_writes_pngs_and_json(tmp_path, run_main):
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    mask = tmp_path / "mask.json"
    code, _, err = run_main("mask", "--heads", "L0.H0,L1.H1", "--out", mask)
    assert code == 0, err
    out = tmp_path / "maps"
    code, stdout, err = run_main("maps", "--images", image, "--heads", "L2.H3", "--text", "a red circle",
                                 "--mask", mask, "--out", out)
    assert code == 0, err
    data = json.loads((out / "maps.json").read_text())
    assert sorted(m["kind"] for m in data["maps"]) == ["attention", "attention_ablated", "spatial"]
    for entry in data["maps"]:
        with Image.open(out / entry["png"]) as png:
            assert png.format == "PNG"


def test_maps_refuses_unknown_heads(tmp_path, run_main):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    code, _, err = run_main("maps", "--images", image, "--heads", "L9.H0", "--out", tmp_path / "maps")
    assert code == 2 and "not a head" in err and not (tmp_path / "maps").exists()
