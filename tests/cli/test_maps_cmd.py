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


def test_maps_of_an_ablated_head_show_the_operator(tmp_path, run_main):
    """Identity ablation: the ablated head's class token reads only itself (no attention on any patch); an unablated
    head's class token spreads its attention over the patches as before."""
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    mask = tmp_path / "mask.json"
    assert run_main("mask", "--heads", "L3.H1", "--out", mask)[0] == 0
    out = tmp_path / "maps"
    code, _, err = run_main("maps", "--images", image, "--heads", "L3.H1,L3.H2", "--mask", mask, "--op", "identity",
                            "--out", out)
    assert code == 0, err
    maps = {(m["kind"], m["head"]): m for m in json.loads((out / "maps.json").read_text())["maps"]}
    assert maps["attention_ablated", "L3.H1"]["ablated"] and maps["attention_ablated", "L3.H1"]["patch_attention"] == 0
    assert not maps["attention_ablated", "L3.H2"]["ablated"] and not maps["attention", "L3.H1"]["ablated"]
    for key in [("attention", "L3.H1"), ("attention", "L3.H2"), ("attention_ablated", "L3.H2")]:
        assert 0 < maps[key]["patch_attention"] <= 1 + 1e-6, key


def test_maps_refuses_unknown_heads(tmp_path, run_main):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    code, _, err = run_main("maps", "--images", image, "--heads", "L9.H0", "--out", tmp_path / "maps")
    assert code == 2 and "not a head" in err and not (tmp_path / "maps").exists()
