"""``clipheads describe``, ``clipheads ccs`` and ``clipheads prune`` on a tiny saved model and tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipheads.cli import app
from clipheads.models.random_init import random_hf_clip, save_hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_cli")
    save_hf(random_hf_clip("tiny"), root / "model")
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_describe_then_ccs_from_descriptions(setup):
    runner = CliRunner()
    out = setup / "out"
    result = runner.invoke(app, ["describe", "--model", str(setup / "model"), "--data", str(setup / "images"),
                                 "--k", "3", "--layers", "1", "--out", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    described = json.loads((out / "descriptions.json").read_text())
    assert [h["head"] for h in described["heads"]] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert described["n_images"] == 10 and all(len(h["texts"]) == 3 for h in described["heads"])
    assert "L1.H2" in result.output

    result = runner.invoke(app, ["ccs", "--model", str(setup / "model"), "--descriptions",
                                 str(out / "descriptions.json"), "--judge", "clip", "--out", str(out)])
    assert result.exit_code == 0, result.output
    scored = json.loads((out / "ccs.json").read_text())
    assert [h["head"] for h in scored["heads"]] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert all(0 <= h["ccs"] <= 3 and h["ccs"] == sum(h["consistent"]) for h in scored["heads"])
    assert scored["judges"] == ["clip"] and "threshold" in scored["meta"]["calibration"]["clip"]
    assert (out / "ccs_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "CCS distribution: 0:" in result.output


def test_describe_reads_shards_and_parquet_as_the_image_folder(setup, tmp_path):
    """describe on a webdataset shard and a parquet file of the same images gives the folder's descriptions (it said
    "found 0 images" for a shard folder and a Hugging Face dataset)."""
    import io
    import tarfile

    import datasets

    files = sorted((setup / "images").rglob("*.png"))
    (tmp_path / "wds" / "test").mkdir(parents=True)
    with tarfile.open(tmp_path / "wds" / "test" / "0.tar", "w") as tar:
        for n, file in enumerate(files):
            for ext, data in (("png", file.read_bytes()), ("txt", b"a picture")):
                info = tarfile.TarInfo(f"{n:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                                "caption": ["a picture"] * len(files)},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "caption": datasets.Value("string")})
                               ).to_parquet(tmp_path / "images.parquet")
    runner = CliRunner()
    texts = {}
    sources = {"folder": setup / "images", "wds": tmp_path / "wds", "parquet": tmp_path / "images.parquet"}
    for name, data in sources.items():
        result = runner.invoke(app, ["describe", "--model", str(setup / "model"), "--data", str(data), "--split",
                                     "test", "--k", "3", "--layers", "1", "--out", str(tmp_path / name),
                                     "--batch-size", "4"])
        assert result.exit_code == 0, result.output
        described = json.loads((tmp_path / name / "descriptions.json").read_text())
        assert described["n_images"] == 10
        texts[name] = [h["texts"] for h in described["heads"]]
    assert texts["wds"] == texts["folder"] and texts["parquet"] == texts["folder"]


def test_describe_convention_is_recorded_and_checked_first(setup, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["describe", "--model", str(setup / "model"), "--data", str(setup / "images"),
                                 "--k", "2", "--layers", "0", "--convention", "centred", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    described = json.loads((tmp_path / "descriptions.json").read_text())
    assert described["meta"]["convention"] == "centred" and all(h["rank"] >= 1 for h in described["heads"])
    result = runner.invoke(app, ["describe", "--model", "no/such-model", "--data", str(setup / "images"),
                                 "--convention", "paper", "--out", str(tmp_path / "bad")])
    assert "unknown decomposition convention 'paper'" in str(result.exception)
    assert not (tmp_path / "bad").exists()


def test_bad_input_is_one_clear_line(setup, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["ccs", "--model", str(setup / "model"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "give --data" in str(result.exception)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["describe", "--model", str(setup / "model"), "--data", str(empty)])
    assert "found 0 images" in str(result.exception)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from clipheads.world import WorldSizes, make_world

    sizes = WorldSizes(train=0, val_ood=12, test_ood=12, test_iid=0, test_anti=0, compositional=0, counterfactual=3)
    return make_world(tmp_path_factory.mktemp("world"), seed=0, sizes=sizes, progress=False)


def _ccs_file(path, scores: list[list[int]], k: int = 3):
    from clipheads.explain.concepts import CCSResult, HeadConcept

    heads = [HeadConcept(layer, head, "colour", ["red"] * k, [i < s for i in range(k)])
             for layer, row in enumerate(scores) for head, s in enumerate(row)]
    return CCSResult(heads, k, (len(scores), len(scores[0])), ["clip"], "clip").save(path)


def test_prune_end_to_end_on_a_tiny_world(setup, world, tmp_path):
    """describe -> ccs -> prune on real files: a table, prune.json, prune.png and MaxSkew per attribute."""
    runner = CliRunner()
    model = str(setup / "model")
    result = runner.invoke(app, ["ccs", "--model", model, "--data", str(world.retrieval), "--split", "val_ood",
                                 "--k", "3", "--judge", "clip", "--out", str(tmp_path), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "ccs.json").read_text())
    assert len(scored["heads"]) == 8  # tiny: 2 layers x 4 heads
    common = ["--model", model, "--retrieval", str(world.retrieval), "--split", "test_ood",
              "--zeroshot", str(world.classification["test_ood"]), "--templates", str(world.templates),
              "--bias", str(world.counterfactual["cue"]), "--bias", str(world.counterfactual["colour"]),
              "--batch-size", "8"]
    out = tmp_path / "top"
    result = runner.invoke(app, ["prune", "--ccs", str(tmp_path / "ccs.json"), "--top", "2", "--seeds", "2",
                                 "--out", str(out), *common])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prune.json").read_text())
    assert len(report["selected"]["heads"]) == 2 and [len(r["heads"]) for r in report["random"]] == [2, 2]
    assert report["operator"] == {"name": "scale", "alpha": 0.0}
    metrics = set(report["baseline"])
    assert {"retrieval/mean_recall", "zeroshot/acc1", "bias:counterfactual_cue/max_skew@10/cue",
            "bias:counterfactual_colour/max_skew@10/colour"} <= metrics
    assert set(report["selected"]["metrics"]) == metrics and all(set(r["metrics"]) == metrics for r in report["random"])
    assert set(report["meta"]["max_skew"]) == {"cue", "colour"}
    for row in report["meta"]["max_skew"].values():
        assert set(row) == {"before", "after", "random_after_mean", "random_after_std"} and row["before"] >= 0
    assert report["meta"]["max_skew"]["cue"]["before"] == report["baseline"]["bias:counterfactual_cue/max_skew@10/cue"]
    assert "MaxSkew@10 per attribute" in result.output and "retrieval/mean_recall" in result.output
    assert "random seed 1: " in result.output
    assert (out / "prune.png").read_bytes()[:4] == b"\x89PNG"


def test_prune_groups_and_an_empty_group(setup, world, tmp_path):
    runner = CliRunner()
    ccs = _ccs_file(tmp_path / "ccs.json", [[3, 3, 2, 2], [2, 1, 0, 2]])
    common = ["--ccs", str(ccs), "--model", str(setup / "model"), "--bias", str(world.counterfactual["cue"]),
              "--skew-k", "4", "--seeds", "1", "--batch-size", "8"]
    result = runner.invoke(app, ["prune", "--group", "low", "--out", str(tmp_path / "low"), *common])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "low" / "prune.json").read_text())
    assert report["selected"]["heads"] == ["L1.H1", "L1.H2"] and report["meta"]["group"] == "low"
    assert set(report["baseline"]) == {"bias/max_skew@4/cue"}  # one attribute: no duplicate mean row
    empty = _ccs_file(tmp_path / "none_high.json", [[2, 2, 2, 2], [2, 1, 0, 2]])
    result = runner.invoke(app, ["prune", "--group", "high", *common[2:], "--ccs", str(empty)])
    assert result.exit_code != 0 and "no head is in the CCS group 'high'" in str(result.exception)
    result = runner.invoke(app, ["prune", "--group", "low", "--out", str(tmp_path / "x"), "--ccs", str(ccs),
                                 "--model", str(setup / "model")])
    assert "give at least one of --data, --zeroshot, --bias" in str(result.exception)


def test_ccs_k_and_layers_select_from_descriptions(setup, tmp_path, run_main):
    """``ccs --descriptions F --k 2`` scored the file's k (3) texts per head and printed CCS 0..3, and a re-run into
    the same folder with another --k returned the same result: --k and --layers were ignored with --descriptions."""
    base = ["--model", setup / "model", "--data", setup / "images", "--layers", "0-1", "--batch-size", 4]
    assert run_main("describe", *base, "--k", 3, "--out", tmp_path / "k3")[0] == 0
    assert run_main("describe", *base, "--k", 2, "--out", tmp_path / "k2")[0] == 0
    three = json.loads((tmp_path / "k3" / "descriptions.json").read_text())["heads"]
    two = json.loads((tmp_path / "k2" / "descriptions.json").read_text())["heads"]
    assert [h["texts"][:2] for h in three] == [h["texts"] for h in two]  # greedy: the first k are a k-run's

    ccs = ["ccs", "--model", setup / "model", "--descriptions", tmp_path / "k3" / "descriptions.json", "--judge",
           "clip", "--out", tmp_path / "ccs"]
    code, out, err = run_main(*ccs, "--k", 2, "--layers", 0)
    assert code == 0, err
    scored = json.loads((tmp_path / "ccs" / "ccs.json").read_text())
    assert scored["k"] == 2 and [h["head"] for h in scored["heads"]] == ["L0.H0", "L0.H1", "L0.H2", "L0.H3"]
    assert [h["descriptions"] for h in scored["heads"]] == [h["texts"] for h in two if h["head"].startswith("L0")]
    assert "Concept Consistency Score (0..2)" in out
    code, _, err = run_main(*ccs, "--k", 4)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "3 texts per head" in err


def test_prune_means_from_a_bad_path_names_means_from(setup, world, tmp_path, run_main):
    """``prune --op mean --means-from notes.txt`` said "--data 'notes.txt': give a folder of images ...": an option
    the command does not have."""
    ccs = _ccs_file(tmp_path / "ccs.json", [[3, 3, 2, 2], [2, 1, 0, 2]])
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = run_main("prune", "--ccs", ccs, "--group", "low", "--op", "mean", "--means-from", notes, "--model",
                            setup / "model", "--bias", world.counterfactual["cue"], "--out", tmp_path / "p")
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --means-from {str(notes)!r}: give a folder")
