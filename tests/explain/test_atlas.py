"""The head atlas: its data, the HTML page, and the page in a real (headless) browser when one is installed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clipheads.explain.atlas import AtlasInputs, build_atlas, render_html, write_atlas
from clipheads.explain.concepts import CCSResult, HeadConcept
from clipheads.explain.textspan import HeadDescription, TextSpanResult

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _inputs(backend) -> AtlasInputs:
    shape = (backend.n_layers, backend.n_heads)
    heads = [(layer, h) for layer in range(shape[0]) for h in range(shape[1])]
    descriptions = TextSpanResult([HeadDescription(layer, h, [f"text {layer}-{h} a", f"text {layer}-{h} b"],
                                                   [0.5, 0.2], 1.0 + layer) for layer, h in heads], 2, 4, 6, 20)
    ccs = CCSResult([HeadConcept(layer, h, "stripes" if (layer, h) == (1, 2) else "colour", ["x", "y"],
                                 [True, layer == 1]) for layer, h in heads], 2, shape, ["clip"], "clip")
    measure = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    return AtlasInputs(descriptions, ccs, {"scan effect": measure, "CCS": ccs.scores()}, {"scan effect": "delta"})


@pytest.fixture(scope="module")
def atlas(tiny_hf):
    return build_atlas(tiny_hf, _images(6), [f"img{i}.png" for i in range(6)], _inputs(tiny_hf), top=3, maps=2)


def test_atlas_data(atlas, tiny_hf):
    assert len(atlas["heads"]) == tiny_hf.n_layers * tiny_hf.n_heads
    head = next(h for h in atlas["heads"] if h["head"] == "L1.H2")
    assert head["label"] == "stripes" and head["ccs"] == 2 and head["texts"][0]["text"] == "text 1-2 a"
    assert head["measures"]["scan effect"] == 1 * tiny_hf.n_heads + 2
    assert len(head["top"]) == 3 and len(head["spatial"]) == 2 and len(head["attention"]) == 2
    scores = [t["score"] for t in head["top"]]
    assert scores == sorted(scores, reverse=True)
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in head["spatial"] + head["attention"])
    assert head["maps_along"] == "text 'text 1-2 a'"


def test_page_is_self_contained(atlas, tmp_path):
    page = render_html(atlas)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: works from file://
    start = page.index('<script type="application/json" id="atlas-data">') + len(
        '<script type="application/json" id="atlas-data">')
    assert json.loads(page[start:page.index("</script>", start)])["model"] == atlas["model"]
    path = write_atlas(tmp_path / "atlas.html", atlas)
    assert path.stat().st_size < 2_000_000


def test_layers_subset_and_refusals(tiny_hf):
    data = build_atlas(tiny_hf, _images(3), ["a", "b", "c"], AtlasInputs(), layers=[1], top=2, maps=0)
    assert {h["layer"] for h in data["heads"]} == {1} and "spatial" not in data["heads"][0]
    import clipheads

    with pytest.raises(clipheads.ClipHeadsError, match="at least 2 images"):
        build_atlas(tiny_hf, _images(1), ["a"], AtlasInputs())
    with pytest.raises(clipheads.ClipHeadsError, match="measure"):
        build_atlas(tiny_hf, _images(2), ["a", "b"], AtlasInputs(measures={"m": torch.zeros(1, 1)}))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_atlas_in_a_real_browser(atlas, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    path = write_atlas(tmp_path / "atlas.html", atlas)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(path.as_uri())
            assert page.locator("#grid button").count() == len(atlas["heads"])
            page.click('#grid button[data-head="L1.H2"]')
            assert page.inner_text("#head-title") == "L1.H2"
            assert "text 1-2 a" in page.inner_text("ol.texts")
            assert page.inner_text("b.label") == "stripes"
            assert page.locator(".spatial img").count() == 2 and page.locator(".attention img").count() == 2
            assert page.evaluate("document.querySelector('.spatial img').naturalWidth") > 0  # decoded
            # keyboard: arrow right then Enter opens the next head
            page.focus('#grid button[data-head="L1.H2"]')
            page.keyboard.press("ArrowRight")
            page.keyboard.press("Enter")
            assert page.inner_text("#head-title") == "L1.H3"
            # search: '/' focuses it; a label keeps only its heads
            page.keyboard.press("/")
            page.keyboard.type("stripes")
            assert page.locator("#grid button:not(.dim)").count() == 1
            page.keyboard.press("Enter")
            assert page.inner_text("#head-title") == "L1.H2"
            # colour by another measure, deep link by hash
            page.select_option("#measure", "CCS")
            page.goto(path.as_uri() + "#L0.H1")
            assert page.inner_text("#head-title") == "L0.H1"
        finally:
            browser.close()
    assert not errors, errors
