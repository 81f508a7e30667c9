"""A Hugging Face Hub dataset id (``--data org/name``) read from the local caches when offline, as
``datasets.load_dataset`` reads it; with no cache, one line that says where it looked and how to get it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clipheads.data import load_classification, load_retrieval
from clipheads.data.sources import detect_source
from clipheads.errors import DataError
from clipheads.eval import FeatureCache, evaluate_retrieval, evaluate_zeroshot

from .test_sources import CAPTIONS, WORDS, karpathy, png  # noqa: F401 (karpathy: a fixture)

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline_home(tmp_path: Path, monkeypatch) -> Path:
    """An empty HF_HOME with the Hub offline: the variables, and the values datasets / huggingface_hub read from them
    when they were imported."""
    import datasets
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return home


def hub_snapshot(home: Path, repo_id: str) -> Path:
    """The Hub cache's layout of a downloaded dataset repository (``huggingface-cli download --repo-type dataset``):
    ``hub/datasets--org--name/{refs/main, snapshots/<rev>/}``; returns the snapshot folder."""
    repo = home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    (snapshot / "data").mkdir(parents=True)
    return snapshot


def test_hub_id_is_read_from_the_hub_cache_offline_and_equals_karpathy(tiny_hf, karpathy: Path,  # noqa: F811
                                                                       offline_home: Path):
    import datasets

    snapshot = hub_snapshot(offline_home, "someone/tiny-flickr")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    table = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(6)],
                                        "caption": CAPTIONS}, features=features)
    table.to_parquet(snapshot / "data" / "test-00000-of-00001.parquet")
    table.select([0, 1]).to_parquet(snapshot / "data" / "train-00000-of-00001.parquet")

    assert detect_source("someone/tiny-flickr") == "hub"
    dataset = load_retrieval("someone/tiny-flickr", split="test")
    assert dataset.format == "hf" and dataset.name == "tiny-flickr" and dataset.captions == CAPTIONS
    expected = evaluate_retrieval(tiny_hf, load_retrieval(karpathy, split="test"), cache=FeatureCache()).metrics
    assert evaluate_retrieval(tiny_hf, dataset, cache=FeatureCache()).metrics == expected
    assert len(load_retrieval("someone/tiny-flickr", split="train")) == 2
    with pytest.raises(DataError, match="has splits train, test; choose one with --split"):
        load_retrieval("someone/tiny-flickr")


def test_hub_classification_id_keeps_its_classlabel_names(tiny_hf, offline_home: Path, tmp_path: Path):
    import datasets

    for i, word in enumerate(WORDS[:3] * 2):
        (tmp_path / "tree" / word).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / word / f"{i}.png").write_bytes(png(i))
    folder = load_classification(tmp_path / "tree", templates=["a {} square"])
    snapshot = hub_snapshot(offline_home, "someone/tiny-colours")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classnames)})
    datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in folder.image_paths],
                                "label": folder.labels}, features=features
                               ).to_parquet(snapshot / "data" / "test-00000-of-00001.parquet")
    dataset = load_classification("someone/tiny-colours", templates=["a {} square"], split="test")
    assert dataset.classnames == folder.classnames and dataset.format == "hf"
    expected = evaluate_zeroshot(tiny_hf, folder, cache=FeatureCache()).metrics
    assert evaluate_zeroshot(tiny_hf, dataset, cache=FeatureCache()).metrics == pytest.approx(expected, nan_ok=True)


def test_hub_id_without_cache_offline_is_one_line_naming_where_it_looked(offline_home: Path):
    with pytest.raises(DataError) as error:
        load_retrieval("nlphuji/flickr30k", split="test")
    message = str(error.value)
    assert "\n" not in message
    assert f"{offline_home / 'datasets' / 'nlphuji___flickr30k'}" in message
    assert f"{offline_home / 'hub' / 'datasets--nlphuji--flickr30k'}" in message
    assert "huggingface-cli download --repo-type dataset nlphuji/flickr30k" in message


def test_a_missing_local_file_is_not_taken_for_a_hub_id(tmp_path: Path):
    assert detect_source("org/name") == "hub"
    with pytest.raises(DataError, match="does not exist"):
        detect_source("data/dataset_coco.json")
    with pytest.raises(DataError, match="does not exist"):
        detect_source(tmp_path / "missing")


def test_eval_takes_a_hub_id_as_data(run_main, karpathy: Path, offline_home: Path, tmp_path: Path):  # noqa: F811
    """``clipheads eval --data org/name`` gives the metrics of the same data in Karpathy form; scan's ``--data``
    refuses a missing file while parsing (a callback in place of ``exists=True``, which would refuse every id)."""
    import datasets

    from clipheads.models.random_init import save_hf, tiny_model

    model = save_hf(tiny_model("hf"), tmp_path / "tiny")
    snapshot = hub_snapshot(offline_home, "someone/tiny-flickr")
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(6)], "captions": CAPTIONS},
                               features=features).to_parquet(snapshot / "data" / "test-00000-of-00001.parquet")
    results = {}
    for name, data in (("hub", "someone/tiny-flickr"), ("karpathy", karpathy)):
        out = tmp_path / f"{name}.json"
        code, _, err = run_main("eval", "-t", "zeroshot_retrieval", "--data", data, "--split", "test", "--model",
                                model, "--out", out)
        assert code == 0, err
        results[name] = json.loads(out.read_text())
    assert results["hub"]["task"] == "retrieval" and results["hub"]["dataset"]["n_images"] == 6
    assert results["hub"]["metrics"] == results["karpathy"]["metrics"]
    code, _, err = run_main("scan", "--data", tmp_path / "missing.json", "--out", tmp_path / "s", forbid_load=True)
    assert code == 2 and "does not exist" in err


def test_scan_runs_and_resumes_on_a_hub_id(run_main, offline_home: Path, tmp_path: Path):
    """A Hub id has no file to fingerprint: its name and its images (dataset fingerprint, Arrow file stats) key the
    run, so the same command resumes (under a clip_benchmark task alias too)."""
    import datasets

    from clipheads.models.random_init import save_hf, tiny_model

    model = save_hf(tiny_model("hf"), tmp_path / "tiny")
    snapshot = hub_snapshot(offline_home, "someone/tiny-flickr")
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(6)], "captions": CAPTIONS},
                               features=features).to_parquet(snapshot / "data" / "test-00000-of-00001.parquet")
    args = ["--data", "someone/tiny-flickr", "--search-split", "test", "--no-report", "--model", model, "--out",
            tmp_path / "scan"]
    code, first, err = run_main("scan", "--task", "retrieval", *args)
    assert code == 0, err
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    code, again, err = run_main("scan", "--task", "zeroshot_retrieval", *args)
    assert code == 0, err
    assert json.loads((tmp_path / "scan" / "summary.json").read_text())["mask"] == summary["mask"]
    evaluated = [int(re.search(r"(\d+) masks evaluated", out).group(1)) for out in (first, again)]
    assert evaluated[1] < evaluated[0]  # resumed: the second run evaluates only what the first did not save
