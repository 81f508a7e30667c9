"""describe, ccs, prune, maps and patch on a saved SigLIP model (attention-pooling head, no class token), through
the real entry point; the one thing SigLIP cannot do (the ``cls`` operator) is one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipheads.models.random_init import save_hf, tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import SiglipImageProcessor

    root = tmp_path_factory.mktemp("siglip_cli")
    model = tiny_model("siglip", seed=3)
    model.image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    save_hf(model, root / "model")
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_describe_ccs_and_prune(setup, run_main, tmp_path):
    model, out = setup / "model", tmp_path / "out"
    code, stdout, err = run_main("describe", "--model", model, "--data", setup / "images", "--k", "3", "--layers",
                                 "1", "--out", out, "--batch-size", "4")
    assert code == 0, err
    described = json.loads((out / "descriptions.json").read_text())
    assert [h["head"] for h in described["heads"]] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert described["n_images"] == 8 and all(len(h["texts"]) == 3 for h in described["heads"])
    code, stdout, err = run_main("ccs", "--model", model, "--descriptions", out / "descriptions.json", "--judge",
                                 "clip", "--out", out)
    assert code == 0, err
    scored = json.loads((out / "ccs.json").read_text())
    assert all(0 <= h["ccs"] <= 3 for h in scored["heads"])
    from clipheads.explain.concepts import CCSResult, HeadConcept

    heads = [HeadConcept(layer, head, "colour", ["red"] * 3, [True] * (layer + head) + [False] * (3 - layer - head))
             for layer in range(2) for head in range(2)]
    ccs = CCSResult(heads, 3, (2, 4), ["clip"], "clip").save(tmp_path / "ccs.json")
    code, stdout, err = run_main("prune", "--ccs", ccs, "--top", "2", "--seeds", "1", "--model", model,
                                 "--zeroshot", setup / "images", "--batch-size", "4", "--out", tmp_path / "prune")
    assert code == 0, err
    report = json.loads((tmp_path / "prune" / "prune.json").read_text())
    assert len(report["selected"]["heads"]) == 2 and "zeroshot/acc1" in report["baseline"]


def test_maps_and_patch(setup, run_main, tmp_path):
    model = setup / "model"
    code, _, err = run_main("maps", "--model", model, "--images", setup / "images" / "a", "--heads", "L1.H2",
                            "--text", "a red circle", "--out", tmp_path / "maps")
    assert code == 0, err
    data = json.loads((tmp_path / "maps" / "maps.json").read_text())
    assert sorted({m["kind"] for m in data["maps"]}) == ["attention", "spatial"] and len(data["maps"]) == 8
    code, _, err = run_main("mask", "--model", model, "--heads", "L0.H1", "--out", tmp_path / "mask.json")
    assert code == 0, err
    code, _, err = run_main("maps", "--model", model, "--images", setup / "images" / "a", "--heads", "L1.H2",
                            "--mask", tmp_path / "mask.json", "--op", "cls", "--out", tmp_path / "maps_cls")
    assert code == 2 and "needs a class token" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run_main("patch", "--model", model, "--source", setup / "images" / "a", "--destination",
                                 setup / "images" / "b", "--heads", "L0.H0,L1.H1", "--out", tmp_path / "patch.json")
    assert code == 0, err
    patched = json.loads((tmp_path / "patch.json").read_text())
    assert patched["heads"] == ["L0.H0", "L1.H1"] and len(patched["pairs"]) == 4
    assert all(np.isfinite(v) for v in patched["mean_explained"].values())
