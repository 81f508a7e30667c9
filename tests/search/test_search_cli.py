"""``clipheads scan``, ``layers`` and ``search`` end to end on a tiny saved model and a tiny dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import clipheads
from clipheads.cli import app
from clipheads.models.random_init import random_hf_clip, save_hf
from clipheads.search import ConfigMismatchError

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
SHAPES = ["cat", "dog", "car", "tree", "house", "circle"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    save_hf(random_hf_clip("tiny", seed=3), root / "model")
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        caption = f"a {COLOURS[i % 6]} {SHAPES[(i * 5) % 6]}"
        images.append({"filename": f"{i}.png", "split": "val" if i < 6 else "test", "imgid": i,
                       "sentences": [{"raw": caption}, {"raw": caption + " on the left"}]})
    (root / "karpathy.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    selection = [{"image": f"{i}.png", "candidates": [f"a {c} cat" for c in COLOURS[:3]], "answer": i % 3}
                 for i in range(6)]
    (root / "selection.json").write_text(json.dumps(selection))
    return root


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def test_scan_then_ga_then_bp(world, tmp_path):
    common = ["--model", world / "model", "--data", world / "karpathy.json", "--batch-size", 16]
    result = invoke("scan", *common, "--out", tmp_path / "scan")
    assert result.exit_code == 0, result.output
    assert "Most harmful heads" in result.output
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    assert summary["search"]["split"] == "karpathy.json:val" and summary["heldout"]["split"] == "karpathy.json:test"
    assert len(json.loads((tmp_path / "scan" / "scan.json").read_text())["heads"]) == 8

    ga = ["search", *common, "--strategy", "ga", "--population", 6, "--generations", 2, "--out", tmp_path / "ga"]
    result = invoke(*ga)
    assert result.exit_code == 0, result.output
    mask = clipheads.HeadMask.load(tmp_path / "ga" / "mask.json")
    assert (tmp_path / "ga" / "scan" / "scan.json").exists() and (tmp_path / "ga" / "fitness.png").exists()
    assert invoke(*ga).exit_code == 0  # resumes the finished run
    assert clipheads.HeadMask.load(tmp_path / "ga" / "mask.json") == mask
    changed = invoke(*ga[:-2], "--seed", 1, "--out", tmp_path / "ga")
    assert isinstance(changed.exception, ConfigMismatchError) and "--seed changed from 0 to 1" in str(changed.exception)

    result = invoke("search", *common, "--strategy", "bp", "--epochs", 1, "--out", tmp_path / "bp")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "bp" / "summary.json").read_text())["gates"]) == 2


def test_same_split_is_refused(world, tmp_path):
    result = invoke("search", "--model", world / "model", "--data", world / "karpathy.json", "--search-split", "val",
                    "--report-split", "val", "--out", tmp_path / "same")
    assert isinstance(result.exception, clipheads.ClipHeadsError)
    assert "--allow-same-split" in str(result.exception)


def test_bad_arguments_fail_before_any_image_is_read(world, tmp_path):
    """Dataset files whose images are all missing: the argument errors must come first."""
    data = json.loads((world / "karpathy.json").read_text())
    for image in data["images"]:
        image["filename"] = f"missing/{image['filename']}"
    (tmp_path / "karpathy.json").write_text(json.dumps(data))
    selection = (world / "selection.json").read_text().replace('"image": "', '"image": "missing/')
    (tmp_path / "selection.json").write_text(selection)
    model = ("--model", world / "model")
    for command in ("scan", "search"):
        result = invoke(command, *model, "--data", tmp_path / "karpathy.json", "--search-split", "test",
                        "--report-split", "test", "--out", tmp_path / command)
        assert "--allow-same-split" in str(result.exception), result.output
    result = invoke("layers", *model, "--data", tmp_path / "selection.json", "--task", "selection", "--ranges", "0-5",
                    "--out", tmp_path / "layers")
    assert isinstance(result.exception, clipheads.MaskError)
    assert "the model has 2 layers, 0..1" in str(result.exception)
    result = invoke("search", *model, "--data", tmp_path / "karpathy.json", "--beta-sweep", "0,0.1,x",
                    "--out", tmp_path / "sweep")
    assert "--beta-sweep takes comma-separated numbers" in str(result.exception), result.output
    result = invoke("search", *model, "--data", tmp_path / "karpathy.json", "--population", 1, "--out", tmp_path / "p")
    assert result.exit_code == 2 and "Invalid value for '--population'" in result.output  # refused at parse time


def test_layer_scan_with_caption_selection(world, tmp_path):
    result = invoke("layers", "--model", world / "model", "--data", world / "selection.json", "--task", "selection",
                    "--ranges", "0,1", "--out", tmp_path / "layers")
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "layers" / "layers.json").read_text())
    assert [g["layers"] for g in layers["groups"]] == ["0", "1"]
    details = layers["groups"][0]["details"]
    assert len(details["logits"]) == 6 and len(details["logits"][0]) == 3
    assert details["selected"][0] in ["a red cat", "a green cat", "a blue cat"]


def test_bp_uses_the_library_defaults_and_says_why_nothing_was_ablated(world, tmp_path):
    from clipheads.search import BPConfig

    common = ["--model", world / "model", "--data", world / "karpathy.json", "--batch-size", 16, "--strategy", "bp"]
    result = invoke("search", *common, "--epochs", 1, "--init-logit", 2, "--out", tmp_path / "bp")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "bp" / "summary.json").read_text())["config"]
    defaults = BPConfig()
    assert (config["lr"], config["beta"], config["threshold"]) == (defaults.lr, defaults.beta, defaults.threshold)
    assert config["init_logit"] == 2.0 and config["epochs"] == 1

    # no training: every gate stays at sigmoid(1.5) = 0.82, above the threshold -> one line saying so
    result = invoke("search", *common, "--epochs", 0, "--out", tmp_path / "none")
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if row.startswith("nothing ablated"))
    assert "lowest gate 0.82 (L0.H0) >= threshold 0.5" in line and "--init-logit 1.5" in line
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert summary["nothing_ablated"].startswith("nothing ablated: lowest gate 0.82")


def test_nothing_ablated_is_printed_once(world, tmp_path):
    """The real command line (its own log handler on stderr): the "nothing ablated" line appears once, under the
    result table, not a second time as a log warning (the library still logs it for library users)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "clipheads", "search", "--model", str(world / "model"), "--data",
                           str(world / "karpathy.json"), "--batch-size", "16", "--strategy", "bp", "--epochs", "0",
                           "--out", str(tmp_path / "none")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).count("nothing ablated") == 1, done.stdout + done.stderr
    assert "nothing ablated: lowest gate 0.82" in done.stdout


def test_search_help_states_bpconfig_defaults():
    from clipheads.search import BPConfig

    result = CliRunner().invoke(app, ["search", "--help"], terminal_width=200)
    text = " ".join(result.output.replace("│", " ").split())
    defaults = BPConfig()
    for phrase in (f"default {defaults.epochs})", f"default {defaults.lr:g})", f"default {defaults.init_logit:g},",
                   f"default {defaults.threshold:g})", f"bp {defaults.beta:g} (BPConfig)"):
        assert phrase in text, phrase
def test_memory_budget_plans_the_cache_and_says_so(world, tmp_path):
    common = ["--model", world / "model", "--data", world / "karpathy.json", "--batch-size", 16]
    result = invoke("scan", *common, "--out", tmp_path / "full")
    assert result.exit_code == 0, result.output
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert full["cache_plan"]["cache_stride"] == 1 and "search cache plan (6 images): cache 2 layers" in result.output
    # one cached layer of 6 images and chunks of 4 rows: the same scores
    one_layer = full["cache_plan"]["cache_bytes"] // 2
    forward_4 = full["cache_plan"]["forward_bytes"] // 4
    budget = 2 * one_layer + forward_4 + 6 * 3 * 32 * 32 * 4 * 2  # both splits' caches and decoded pixels
    result = invoke("scan", *common, "--memory-budget", budget, "--out", tmp_path / "small")
    assert result.exit_code == 0, result.output
    small = json.loads((tmp_path / "small" / "summary.json").read_text())
    assert (small["cache_plan"]["n_cached"], small["cache_plan"]["rows"]) == (1, 4)
    assert small["cache_plan"]["budget_bytes"] < budget  # what the held-out split left
    assert "cache 1 layer (every 2) float32 on device" in small["cache_plan"]["description"]
    assert "4 rows per forward" in " ".join(result.output.split())
    scores = [json.loads((tmp_path / run / "scan.json").read_text())["heads"] for run in ("full", "small")]
    assert scores[0] == scores[1]

    bad = invoke("scan", *common, "--memory-budget", "8 parsecs", "--out", tmp_path / "bad")
    assert "not a memory size: '8 parsecs'" in str(bad.exception) and not (tmp_path / "bad").exists()
    tiny = invoke("scan", *common, "--memory-budget", "1KiB", "--out", tmp_path / "tiny")
    assert "memory budget 1 KiB is too small for 6 images" in str(tiny.exception)


def test_memory_budget_keeps_the_pixels_as_uint8_codes_with_the_same_scores(world, tmp_path):
    """A budget that the float pixels would take more than a quarter of: uint8 codes, the same scores (re-reading
    from disk is tested in test_pixels.py: this world's cache does not fit beside so small a budget)."""
    common = ["--model", world / "model", "--data", world / "karpathy.json", "--batch-size", 16]
    full = invoke("scan", *common, "--out", tmp_path / "full")
    assert full.exit_code == 0 and "pixels float32 (72 KiB)" in " ".join(full.output.split())
    values = 6 * 3 * 32 * 32  # of one split's pixels: float32 up to a quarter of the budget, then uint8
    result = invoke("scan", *common, "--memory-budget", 16 * values - 4, "--out", tmp_path / "uint8")
    assert result.exit_code == 0, result.output
    assert "pixels uint8 exact codes (21 KiB)" in " ".join(result.output.split())
    scores = [json.loads((tmp_path / run / "scan.json").read_text())["heads"] for run in ("full", "uint8")]
    assert scores[0] == scores[1]


def test_bp_from_attribution_says_its_memory_plans(world, tmp_path):
    common = ["--model", world / "model", "--data", world / "karpathy.json", "--batch-size", 16]
    result = invoke("search", *common, "--strategy", "bp", "--epochs", 1, "--seed-from", "attribution",
                    "--out", tmp_path / "bp")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "attribution plan: 6 images per gated forward" in said and "AAT-BP: activation checkpointing off" in said
    summary = json.loads((tmp_path / "bp" / "summary.json").read_text())
    assert summary["activation_checkpointing"] is False


def _shards_and_parquet(world, root):
    """The world's Karpathy images as clip_benchmark's {split}/ shards and as one parquet file (one split)."""
    import io
    import tarfile

    import datasets

    entries = json.loads((world / "karpathy.json").read_text())["images"]
    for split in ("val", "test"):
        (root / "wds" / split).mkdir(parents=True)
        with tarfile.open(root / "wds" / split / "0.tar", "w") as tar:
            for entry in (e for e in entries if e["split"] == split):
                text = "\n".join(s["raw"] for s in entry["sentences"]).encode()
                for ext, data in (("png", (world / entry["filename"]).read_bytes()), ("txt", text)):
                    info = tarfile.TarInfo(f"{entry['imgid']:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    datasets.Dataset.from_dict({"image": [{"bytes": (world / e["filename"]).read_bytes(), "path": None}
                                          for e in entries],
                                "captions": [[s["raw"] for s in e["sentences"]] for e in entries]},
                               features=features).to_parquet(root / "one.parquet")


def test_scan_on_split_shards_equals_karpathy_and_one_split_data_is_not_held_out(world, tmp_path):
    """scan on a folder of {split}/ shards said "'wds' has no shards for split None" (the run key read no split);
    on a one-split parquet file the default val search and test report read the same images, reported as held-out."""
    _shards_and_parquet(world, tmp_path)
    common = ["--model", world / "model", "--batch-size", 16, "--top-k", 2]
    summaries = {}
    for name, data in (("karpathy", world / "karpathy.json"), ("wds", tmp_path / "wds")):
        result = invoke("scan", *common, "--data", data, "--out", tmp_path / f"scan_{name}")
        assert result.exit_code == 0, result.output
        summaries[name] = json.loads((tmp_path / f"scan_{name}" / "summary.json").read_text())
    assert summaries["wds"]["search"]["split"] == "wds:val" and summaries["wds"]["heldout"]["split"] == "wds:test"
    for part in ("search", "heldout"):
        assert summaries["wds"][part]["vanilla"] == summaries["karpathy"][part]["vanilla"]
        assert summaries["wds"][part]["ablated"] == summaries["karpathy"][part]["ablated"]
    assert summaries["wds"]["mask"] == summaries["karpathy"]["mask"]
    result = invoke("scan", *common, "--data", tmp_path / "one.parquet", "--out", tmp_path / "scan_one")
    assert isinstance(result.exception, clipheads.ClipHeadsError) and not (tmp_path / "scan_one").exists()
    assert "are the same images (the data have one split)" in str(result.exception)
    result = invoke("scan", *common, "--data", tmp_path / "one.parquet", "--no-report", "--out", tmp_path / "one")
    assert result.exit_code == 0, result.output


def test_scan_and_search_take_the_hugging_face_column_options(world, tmp_path):
    """A parquet file whose image column is 'photo' (and the Karpathy split in a 'split' column): scan said "name it
    with --image-column", an option only eval had."""
    import datasets

    entries = json.loads((world / "karpathy.json").read_text())["images"]
    features = datasets.Features({"photo": datasets.Image(), "sentences": datasets.Sequence(datasets.Value("string")),
                                  "split": datasets.Value("string")})
    datasets.Dataset.from_dict({"photo": [{"bytes": (world / e["filename"]).read_bytes(), "path": None}
                                          for e in entries],
                                "sentences": [[s["raw"] for s in e["sentences"]] for e in entries],
                                "split": [e["split"] for e in entries]}, features=features
                               ).to_parquet(tmp_path / "photos.parquet")
    common = ["--model", world / "model", "--batch-size", 16, "--top-k", 2]
    summaries = {}
    for name, data, extra in (("karpathy", world / "karpathy.json", []),
                              ("parquet", tmp_path / "photos.parquet", ["--image-column", "photo"])):
        result = invoke("scan", *common, "--data", data, *extra, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    for part in ("search", "heldout"):
        assert summaries["parquet"][part]["vanilla"] == summaries["karpathy"][part]["vanilla"]
    assert summaries["parquet"]["mask"] == summaries["karpathy"]["mask"]
    result = invoke("search", "--strategy", "greedy", "--model", world / "model", "--data", tmp_path / "photos.parquet",
                    "--image-column", "photo", "--text-column", "sentences", "--out", tmp_path / "greedy")
    assert result.exit_code == 0, result.output
