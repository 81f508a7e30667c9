"""Re-running ``scan``/``search`` into an existing --out resumes only the same run: anything that changes results
(precision, templates content, dataset content or images, weights) is refused with exit code 2 and one line that
names the change; options that change no result (batch size, workers) do not block the resume."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from clipheads.models.random_init import random_hf_clip, save_hf

WORDS = ["red", "green", "blue", "yellow", "black", "white"]


def _world(root, seed: int, captions_suffix: str = "") -> None:
    """A retrieval file with 4 val + 4 test images (noise drawn with ``seed``) and an ImageFolder of 2 classes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "val" if i < 4 else "test", "imgid": i,
                       "sentences": [{"raw": f"a {WORDS[i % 6]} thing{captions_suffix}"}]})
    (root / "data.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    for name in ("cat", "dog"):
        folder = root / "classes" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "templates.txt").write_text("a photo of a {}\n")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_hf(random_hf_clip("tiny", seed=3), path)
    return path


def refused(run_main, *args, forbid_load: bool = False) -> str:
    """Run a command that must be refused: exit code 2 and exactly one ``error:`` line (returned)."""
    code, out, err = run_main(*args, forbid_load=forbid_load)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert "Traceback" not in out + err
    return lines[0]


def scores(out) -> dict:
    """scan.json without its timing and the time it was written (two runs may straddle a second)."""
    result = json.loads((out / "scan.json").read_text())
    result.pop("wall_seconds")
    result.get("run", {}).pop("written", None)
    return result


def scan_args(model, data, out, *extra):
    return ["scan", "--model", model, "--data", data, "--search-split", "val", "--report-split", "none",
            "--batch-size", 16, "--out", out, *extra]


def test_unchanged_rerun_resumes_with_identical_results_and_a_changed_precision_is_refused(model, tmp_path, run_main):
    _world(tmp_path / "w", seed=0)
    args = scan_args(model, tmp_path / "w" / "data.json", tmp_path / "out")
    code, out, err = run_main(*args)
    assert code == 0, err
    scan = scores(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["precision"] == "fp32" and config["inputs"]["weights"]["n_tensors"] > 0
    assert config["inputs"]["data"]["file"]["path"] == str((tmp_path / "w" / "data.json").resolve())

    # interrupted after 3 heads: the re-run scores the other heads and reports exactly the same scan
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert len(state["scores"]) == 8
    state["scores"] = dict(list(state["scores"].items())[:3])
    (tmp_path / "out" / "state.json").write_text(json.dumps(state))
    (tmp_path / "out" / "scan.json").unlink()
    code, out, err = run_main(*args)
    assert code == 0, err
    assert scores(tmp_path / "out") == scan

    # another batch size or worker count changes no result: it does not block the resume
    code, out, err = run_main(*args[:-4], "--batch-size", 8, "--num-workers", 1, "--out", tmp_path / "out")
    assert code == 0, err
    resumed = scores(tmp_path / "out")
    np.testing.assert_allclose(resumed["scores"], scan["scores"], atol=1e-6)  # recall: the same up to rounding

    line = refused(run_main, *args, "--precision", "bf16")
    assert "--precision changed from fp32 to bf16" in line and "weights" not in line
    assert scores(tmp_path / "out") == scan  # nothing was touched


def test_a_changed_templates_file_is_refused(model, tmp_path, run_main):
    _world(tmp_path / "w", seed=0)
    templates = tmp_path / "w" / "templates.txt"
    args = ["scan", "--model", model, "--task", "zeroshot", "--data", tmp_path / "w" / "classes", "--templates",
            templates, "--search-split", "none", "--report-split", "none", "--batch-size", 16, "--out",
            tmp_path / "out"]
    code, _, err = run_main(*args)
    assert code == 0, err
    templates.write_text("a photo of a {}\na drawing of a {}\n")  # same path, other content
    assert "the templates file differs (content changed)" in refused(run_main, *args)
    other = tmp_path / "other.txt"
    other.write_text("a sketch of a {}\n")
    line = refused(run_main, *args[:8], other, *args[9:])
    assert f"the templates file differs (content changed: {templates.resolve()} -> {other.resolve()})" in line
    line = refused(run_main, *args[:7], *args[9:])  # back to the default templates
    assert f"the templates file changed from {templates.resolve()} to (not given)" in line


def test_the_same_relative_data_from_another_folder_is_refused_unless_it_is_the_same_content(model, tmp_path,
                                                                                           run_main, monkeypatch):
    _world(tmp_path / "a", seed=0)
    _world(tmp_path / "b", seed=1)  # same file names, same dataset file, other images
    _world(tmp_path / "c", seed=0, captions_suffix=" here")  # other captions
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # copy2: same bytes, same modification times
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "a")
    code, _, err = run_main(*scan_args(model, "data.json", out))
    assert code == 0, err
    scan = scores(out)

    monkeypatch.chdir(tmp_path / "b")
    line = refused(run_main, *scan_args(model, "data.json", out))
    assert "the images it lists differ" in line and "dataset file differs" not in line

    monkeypatch.chdir(tmp_path / "c")
    line = refused(run_main, *scan_args(model, "data.json", out))
    assert f"the dataset file differs (content changed: {tmp_path.resolve() / 'a' / 'data.json'} -> " \
           f"{tmp_path.resolve() / 'c' / 'data.json'})" in line

    monkeypatch.chdir(tmp_path / "copy")  # the same dataset elsewhere: the same run, resumed
    code, _, err = run_main(*scan_args(model, "data.json", out))
    assert code == 0, err
    assert scores(out) == scan


def test_changed_weights_and_search_options_are_refused(model, tmp_path, run_main):
    _world(tmp_path / "w", seed=0)
    weights = tmp_path / "m"
    shutil.copytree(model, weights)
    args = ["search", "--model", weights, "--data", tmp_path / "w" / "data.json", "--strategy", "greedy",
            "--max-heads", 1, "--seed-from", "none", "--report-split", "none", "--batch-size", 16, "--out",
            tmp_path / "out"]
    code, _, err = run_main(*args)
    assert code == 0, err
    line = refused(run_main, *args, "--beta", 0.5)
    assert "--beta changed from 0.01 to 0.5" in line
    save_hf(random_hf_clip("tiny", seed=4), weights)  # retrained in place: same folder, other weights
    line = refused(run_main, *args)
    assert "the model's weights differ" in line and "--model" not in line


def test_a_folder_from_an_older_clipheads_is_refused(model, tmp_path, run_main):
    _world(tmp_path / "w", seed=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"command": "scan", "model": str(model), "data": "data.json"}))
    line = refused(run_main, *scan_args(model, tmp_path / "w" / "data.json", out))
    assert "does not record what its results depend on" in line
    assert os.listdir(out) == ["config.json"]


def test_a_run_nested_inside_another_runs_folder_is_refused_before_any_work(model, tmp_path, run_main):
    _world(tmp_path / "w", seed=0)
    data = tmp_path / "w" / "data.json"
    code, _, err = run_main(*scan_args(model, data, tmp_path / "s1"))
    assert code == 0, err
    # a config.json above --out that is not a clipheads run's does not count
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "config.json").write_text('{"my": "settings"}')
    code, _, err = run_main(*scan_args(model, data, tmp_path / "proj" / "runs" / "s2"))
    assert code == 0, err
    before = sorted(p.name for p in (tmp_path / "s1").iterdir())
    line = refused(run_main, *scan_args(model, data, tmp_path / "s1" / "sub"), forbid_load=True)
    assert "inside the run folder" in line and str(tmp_path / "s1") in line
    assert sorted(p.name for p in (tmp_path / "s1").iterdir()) == before  # nothing written into the run
