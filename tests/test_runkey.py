"""Run keys: JSON round trips, what counts as a change (content, not location) and the phrases naming it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from clipheads.errors import ClipHeadsError
from clipheads.runkey import DatasetKey, FileKey, ImagesKey, RunKey, RunKeyError, WeightsKey, check_same_run


def _dataset(root, pixels: bytes = b"\x01\x02"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.json").write_text('["a.png", "b.png"]')
    for name in ("a.png", "b.png"):
        (root / name).write_bytes(pixels)
        os.utime(root / name, ns=(1_000_000_000, 1_000_000_000))
    return DatasetKey.of(root / "data.json", [root / "a.png", root / "b.png"])


def test_a_run_key_round_trips_through_json(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {}\n")
    key = RunKey({"command": "scan", "precision": "fp32", "alpha": None, "ranges": [1, 2]},
                 {"data": _dataset(tmp_path / "d"), "templates": FileKey.of(tmp_path / "t.txt"), "report_data": None,
                  "weights": WeightsKey.of(torch.nn.Linear(3, 2))}, {"device": "cpu"})
    again = RunKey.from_dict(json.loads(json.dumps(key.to_dict())))
    assert again == key and again.changes(key) == []
    with pytest.raises(RunKeyError):
        RunKey.from_dict({"command": "scan"})  # no run key: written by an older clipheads


def test_content_not_location_is_the_identity_of_a_dataset(tmp_path):
    original = _dataset(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # same bytes and times elsewhere
    moved = DatasetKey.of(tmp_path / "moved" / "data.json", [tmp_path / "moved" / n for n in ("a.png", "b.png")])
    assert moved.file.path != original.file.path
    assert RunKey(inputs={"data": original}).changes(RunKey(inputs={"data": moved})) == []
    other = _dataset(tmp_path / "b", pixels=b"\x01\x02\x03")
    assert RunKey(inputs={"data": original}).changes(RunKey(inputs={"data": other})) == [
        "the images it lists differ (names, sizes or modification times changed)"]
    (tmp_path / "b" / "data.json").write_text('["a.png"]')
    fewer = DatasetKey.of(tmp_path / "b" / "data.json", [tmp_path / "b" / "a.png"])
    change = RunKey(inputs={"data": original}).changes(RunKey(inputs={"data": fewer}))
    assert change[0].startswith("the dataset file differs (content changed: ") and "2 -> 1 images" in change[0]
    assert ImagesKey.of([tmp_path / "missing.png"], tmp_path).count == 1  # a missing image is a fingerprint too


def test_options_and_weights_are_named_when_they_change():
    model = torch.nn.Linear(3, 2)
    before = RunKey({"command": "scan", "precision": "fp32", "op": "mean"}, {"weights": WeightsKey.of(model)})
    with torch.no_grad():
        model.weight.add_(1.0)  # an in-place update is noticed (version counter), not served from the cache
    after = RunKey({"command": "scan", "precision": "fp32", "op": "identity"}, {"weights": WeightsKey.of(model)})
    assert before.changes(after) == ["--op changed from mean to identity", "the model's weights differ"]
    half = RunKey({"command": "scan", "precision": "bf16", "op": "mean"}, {"weights": WeightsKey.of(model.bfloat16())})
    assert before.changes(half)[0] == "--precision changed from fp32 to bf16" and len(before.changes(half)) == 1


def test_check_same_run_raises_one_line_with_the_given_error(tmp_path):
    old = RunKey({"threshold": 0.05}).to_dict()
    check_same_run(old, RunKey({"threshold": 0.05}), "x", "use another folder")
    with pytest.raises(ClipHeadsError) as refused:
        check_same_run(old, RunKey({"threshold": 0.2}), "x", "use another folder", error=ClipHeadsError)
    assert str(refused.value) == ("x holds another run (--threshold changed from 0.05 to 0.2); re-run with the same "
                                  "options and inputs to resume it, or use another folder")
    with pytest.raises(ClipHeadsError, match="cannot read"):
        FileKey.of(tmp_path / "missing.txt")
