"""``--precision`` has one meaning (open_clip's) in every command: ``eval`` and ``scan`` given the same value run the
model the same way and record it; ``--no-report`` is ``scan``'s old ``--report-split none``."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import clipheads
from clipheads.models.random_init import save_hf, tiny_model
from clipheads.precision import parse_precision


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(tiny_model("hf"), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def data(tmp_path):
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30)]
    images = []
    for i, colour in enumerate(colours * 2):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "val" if i < 4 else "test",
                       "sentences": [{"raw": f"a {['red', 'green', 'blue', 'yellow'][i % 4]} square"}]})
    (tmp_path / "data.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    return tmp_path / "data.json"


@pytest.fixture()
def spy(monkeypatch):
    """``clipheads.load`` that records, at every forward of the image tower's first MLP, whether autocast was on (and
    its dtype) and the dtype of that layer's weights."""
    seen: set = set()
    load = clipheads.load

    def record(module, args):
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen.add((autocast, module.weight.dtype))

    def spying_load(*args, **kwargs):
        backend = load(*args, **kwargs)
        backend.model.vision_model.encoder.layers[0].mlp.fc1.register_forward_pre_hook(record)
        return backend

    monkeypatch.setattr(clipheads, "load", spying_load)
    return seen


@pytest.mark.parametrize(("value", "autocast", "weights"), [
    ("amp_bf16", torch.bfloat16, torch.float32), ("bf16", None, torch.bfloat16), ("fp32", None, torch.float32)])
def test_eval_and_scan_run_the_model_alike_and_record_it(value, autocast, weights, model_dir, data, tmp_path, spy,
                                                        run_main):
    code, _, err = run_main("eval", "--model", model_dir, "--task", "retrieval", "--data", data, "--split", "test",
                            "--precision", value, "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert spy == {(autocast, weights)}
    spy.clear()
    code, _, err = run_main("scan", "--model", model_dir, "--data", data, "--search-split", "val", "--precision", value,
                            "--out", tmp_path / "scan")
    assert code == 0, err
    assert spy == {(autocast, weights)}

    recorded = parse_precision(value).to_dict()
    assert json.loads((tmp_path / "eval.json").read_text())["run"]["precision"] == recorded
    assert json.loads((tmp_path / "scan" / "scan.json").read_text())["run"]["precision"] == recorded
    assert json.loads((tmp_path / "scan" / "config.json").read_text())["precision"] == value  # the resume key


def test_the_alias_is_canonical_and_unknown_values_are_one_line(model_dir, data, tmp_path, run_main):
    code, _, err = run_main("eval", "--model", model_dir, "--task", "retrieval", "--data", data, "--split", "test",
                            "--precision", "amp_bfloat16", "--out", tmp_path / "eval.json")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["options"]["precision"] == "amp_bf16" and report["run"]["precision"]["autocast"] == "bfloat16"
    for command in (["eval", "--task", "retrieval"], ["scan"], ["describe"]):
        code, out, err = run_main(*command, "--data", data, "--precision", "int8", forbid_load=True)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "unknown precision 'int8'" in lines[0], (command, out, err)


def test_no_report_is_the_old_report_split_none(model_dir, data, tmp_path, run_main):
    args = ["scan", "--model", model_dir, "--data", data, "--search-split", "val", "--out", tmp_path / "scan"]
    code, _, err = run_main(*args, "--report-split", "none")
    assert code == 0, err
    assert json.loads((tmp_path / "scan" / "summary.json").read_text())["heldout"] is None
    assert json.loads((tmp_path / "scan" / "config.json").read_text())["report_split"] is None
    first = json.loads((tmp_path / "scan" / "scan.json").read_text())
    code, out, err = run_main(*args, "--no-report")  # the same run key: it resumes (nothing left to do)
    assert code == 0, err
    assert json.loads((tmp_path / "scan" / "scan.json").read_text())["scores"] == first["scores"]
    code, _, err = run_main(*args, "--no-report", "--report-data", data, forbid_load=True)
    assert code == 2 and "--no-report and --report-data" in err
