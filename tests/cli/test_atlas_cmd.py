"""``clipheads atlas`` on the bundled model: one HTML file; bad inputs are one error line before any work."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image


def _images(folder, n):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_atlas_writes_one_page(tmp_path, run_main):
    images = _images(tmp_path / "images", 4)
    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps({"delta": np.linspace(-1, 1, 48).reshape(6, 8).tolist()}))
    out = tmp_path / "atlas.html"
    code, stdout, err = run_main("atlas", "--data", images, "--scan", scan, "--layers", "4-5", "--maps", "2",
                                 "--out", out)
    assert code == 0, err
    page = out.read_text()
    assert "16 heads" in stdout and page.startswith("<!DOCTYPE html>")
    start = page.index('id="atlas-data">') + len('id="atlas-data">')
    data = json.loads(page[start:page.index("</script>", start)])
    assert data["layers"] == [4, 5] and list(data["measures"]) == ["scan effect"]
    assert abs(data["heads"][0]["measures"]["scan effect"] - np.linspace(-1, 1, 48)[32]) < 1e-6


def test_atlas_refuses_a_bad_scan_file_and_output(tmp_path, run_main):
    images = _images(tmp_path / "images", 2)
    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps({"delta": [[0.0]]}))
    code, _, err = run_main("atlas", "--data", images, "--scan", scan, "--out", tmp_path / "a.html")
    assert code == 2 and "the model has (6, 8) heads" in err and not (tmp_path / "a.html").exists()
    (tmp_path / "photo.html").mkdir()
    code, _, err = run_main("atlas", "--data", images, "--out", tmp_path / "photo.html", forbid_load=True)
    assert code == 2 and err.count("error:") == 1
