"""``--pretrained`` as clip_benchmark spells it (``--model ViT-B-32 --pretrained laion2b_s34b_b79k``) on every command
that takes ``--model``: the tag or checkpoint reaches open_clip's loader; the bundled model refuses it in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipheads
from clipheads.models.openclip import TINY_OPEN_CLIP

from .test_bad_inputs import COMMANDS


def _options(command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", ())}


def test_every_command_with_a_model_takes_pretrained():
    with_model = {path for path, command in COMMANDS.items() if "--model" in _options(command)}
    assert with_model and with_model == {path for path, command in COMMANDS.items()
                                         if "--pretrained" in _options(command)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    backend = clipheads.load(TINY_OPEN_CLIP)
    checkpoints = []
    for seed in (0, 1):  # two checkpoints of the same architecture, different weights
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in backend.model.parameters():
                parameter.normal_(0, 0.05)
        checkpoints.append(root / f"ckpt{seed}.pt")
        torch.save(backend.model.state_dict(), checkpoints[-1])
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30), (20, 20, 20), (240, 240, 240)]
    (root / "img").mkdir()
    images = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(root / "img" / f"{i}.png")
        images.append({"filename": f"{i}.png", "filepath": "img", "split": "test",
                       "sentences": [{"raw": f"a photo {i}"}, {"raw": f"picture {i}"}]})
    (root / "data.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return root, checkpoints


def _eval(run_main, root: Path, out: Path, *model: str) -> dict:
    code, _, err = run_main("eval", "--task", "retrieval", "--data", root / "data.json", "--out", out, *model)
    assert code == 0, err
    return json.loads(out.read_text())["metrics"]


def test_eval_with_pretrained_equals_the_model_loaded_with_it(setup, run_main, tmp_path):
    root, (first, second) = setup
    saved = clipheads.save(clipheads.load(TINY_OPEN_CLIP, pretrained=str(first)), tmp_path / "saved")
    by_option = _eval(run_main, root, tmp_path / "a.json", "--model", TINY_OPEN_CLIP, "--pretrained", first)
    by_folder = _eval(run_main, root, tmp_path / "b.json", "--model", saved)
    other = _eval(run_main, root, tmp_path / "c.json", "--model", TINY_OPEN_CLIP, "--pretrained", second)
    assert by_option == by_folder
    # the checkpoint was read: the other checkpoint's embeddings differ (its metrics may still tie on 6 images)
    with torch.no_grad():
        a = clipheads.load(TINY_OPEN_CLIP, pretrained=str(first)).encode_text(["a photo 1"])
        b = clipheads.load(TINY_OPEN_CLIP, pretrained=str(second)).encode_text(["a photo 1"])
    assert not torch.equal(a, b) and set(other) == set(by_option)


def test_pretrained_for_the_bundled_model_is_one_line_before_loading(setup, run_main, tmp_path):
    root, _ = setup
    code, _, err = run_main("eval", "--task", "retrieval", "--data", root / "data.json", "--out", tmp_path / "r.json",
                            "--pretrained", "laion2b_s34b_b79k")
    assert code == 2 and err.count("\n") == 1 and "bundled model has no pretrained tags" in err
    assert not (tmp_path / "r.json").exists()


def test_scan_passes_pretrained_too(setup, run_main, tmp_path):
    root, (first, _) = setup
    code, _, err = run_main("scan", "--model", TINY_OPEN_CLIP, "--pretrained", "no-such-tag", "--data",
                            root / "data.json", "--out", tmp_path / "scan")
    assert code == 2 and "no-such-tag" in err and err.count("\n") == 1
