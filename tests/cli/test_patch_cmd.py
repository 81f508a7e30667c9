"""``clipheads patch`` on the bundled model: a table, a JSON beside it, one error line for bad input."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image


def _images(folder, n, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_patch_prints_a_table_and_writes_json(tmp_path, run_main):
    src, dst = _images(tmp_path / "src", 2, 0), _images(tmp_path / "dst", 2, 1)
    code, out, err = run_main("patch", "--source", src, "--destination", dst, "--heads", "L0.H0,L2.H1",
                              "--out", tmp_path / "patch.json")
    assert code == 0, err
    assert "L0.H0" in out and "all together" in out
    data = json.loads((tmp_path / "patch.json").read_text())
    assert data["heads"] == ["L0.H0", "L2.H1"] and len(data["pairs"]) == 2
    assert all(np.isfinite(v) for v in data["mean_explained"].values())


def test_patch_refuses_unpaired_images_before_loading(tmp_path, run_main):
    src, dst = _images(tmp_path / "src", 2, 0), _images(tmp_path / "dst", 1, 1)
    code, _, err = run_main("patch", "--source", src, "--destination", dst, "--heads", "L0.H0", forbid_load=True)
    assert code == 2 and err.count("error:") == 1 and "pair them" in err


def test_patch_refuses_unknown_heads(tmp_path, run_main):
    src, dst = _images(tmp_path / "src", 1, 0), _images(tmp_path / "dst", 1, 1)
    code, _, err = run_main("patch", "--source", src / "0.png", "--destination", dst / "0.png", "--heads", "L99.H0")
    assert code == 2 and "not a head" in err
