"""Counterfactual (bias) sets as Hugging Face datasets in SocialCounterfactuals' columns (``image``, ``caption``,
``counterfactual_set``, ``a1_type``, ``a1``, ``a2_type``, ``a2``, as ``Intel/SocialCounterfactuals`` publishes them)
give the metrics of the same data in clipheads' bias JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from clipheads.data import load_counterfactual
from clipheads.data.hf import neutral_text
from clipheads.errors import DataError
from clipheads.eval import FeatureCache, evaluate_bias

RACES, GENDERS, JOBS = ("Black", "Asian"), ("man", "woman"), ("doctor", "chef")
ROWS = [(job, race, gender) for job in JOBS for race in RACES for gender in GENDERS]  # 2 sets of 4 images


def png(n: int) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (32, 32), (30 * n % 256, 240 - 25 * n, 60 + 20 * n))
    image.paste((200, 40 * n % 256, 20), (3 * n, 2, 3 * n + 9, 14))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption(job: str, race: str, gender: str) -> str:
    return f"A photo of {'an' if race[0] in 'AEIOU' else 'a'} {race} {gender} {job}"


@pytest.fixture()
def as_json(tmp_path: Path) -> Path:
    """The same images in clipheads' bias JSON: the intersection race-gender is the attribute the sets vary."""
    (tmp_path / "img").mkdir()
    images = []
    for n, (job, race, gender) in enumerate(ROWS):
        (tmp_path / "img" / f"{n}.png").write_bytes(png(n))
        images.append({"image": f"img/{n}.png", "group": f"{job}_set", "attribute": "race-gender",
                       "value": f"{race} {gender}"})
    path = tmp_path / "bias.json"
    path.write_text(json.dumps({"queries": ["A photo of a doctor", "A photo of a chef"], "images": images}))
    return path


def social_counterfactuals(**renamed: str):
    import datasets

    columns = {"image": [{"bytes": png(n), "path": None} for n in range(len(ROWS))],
               "caption": [caption(*row) for row in ROWS],
               "counterfactual_set": [f"{job}_set" for job, _, _ in ROWS],
               "a1_type": ["race"] * len(ROWS), "a1": [race for _, race, _ in ROWS],
               "a2_type": ["gender"] * len(ROWS), "a2": [gender for _, _, gender in ROWS]}
    features = {"image": datasets.Image(), **{name: datasets.Value("string") for name in columns if name != "image"}}
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return table.rename_columns(renamed) if renamed else table


def test_social_counterfactuals_columns_equal_the_bias_json(tiny_hf, as_json: Path, tmp_path: Path):
    import datasets

    datasets.DatasetDict({"train": social_counterfactuals()}).save_to_disk(tmp_path / "social")
    dataset = load_counterfactual(tmp_path / "social")
    expected = load_counterfactual(as_json)
    assert dataset.queries == expected.queries == ["A photo of a doctor", "A photo of a chef"]
    assert (dataset.groups, dataset.attributes, dataset.values) == (expected.groups, expected.attributes,
                                                                   expected.values)
    ours = evaluate_bias(tiny_hf, dataset, k=2, cache=FeatureCache()).metrics
    assert ours == evaluate_bias(tiny_hf, expected, k=2, cache=FeatureCache()).metrics
    assert set(ours) == {"max_skew@2/race-gender", "max_skew@2"}  # named by the intersection the sets vary


def test_column_options_and_a_query_file(tiny_hf, as_json: Path, tmp_path: Path):
    """Other uploads: named columns (one per attribute, no *_type), queries from a file."""
    table = social_counterfactuals(image="img", counterfactual_set="set_id", a1="race", a2="gender")
    table.remove_columns(["a1_type", "a2_type", "caption"]).to_parquet(tmp_path / "cf.parquet")
    (tmp_path / "queries.txt").write_text("# neutral\nA photo of a doctor\nA photo of a chef\n")
    dataset = load_counterfactual(tmp_path / "cf.parquet", image_column="img", group_column="set_id",
                                  attribute_columns="race,gender", queries=tmp_path / "queries.txt")
    expected = load_counterfactual(as_json)
    assert dataset.attributes == expected.attributes and dataset.values == expected.values
    assert evaluate_bias(tiny_hf, dataset, k=2, cache=FeatureCache()).metrics == evaluate_bias(
        tiny_hf, expected, k=2, cache=FeatureCache()).metrics
    with pytest.raises(DataError, match="has no caption column to derive neutral queries from; give them with "
                                        "--queries"):
        load_counterfactual(tmp_path / "cf.parquet", image_column="img", group_column="set_id",
                            attribute_columns="race,gender")
    with pytest.raises(DataError, match="has no attribute columns .*name them with --attribute-columns"):
        load_counterfactual(tmp_path / "cf.parquet", image_column="img", group_column="set_id",
                            queries=tmp_path / "queries.txt")
    with pytest.raises(DataError, match="has no column 'age'"):
        load_counterfactual(tmp_path / "cf.parquet", image_column="img", group_column="set_id",
                            attribute_columns="race,age", queries=tmp_path / "queries.txt")


def test_eval_bias_reads_a_social_counterfactuals_parquet(run_main, as_json: Path, tmp_path: Path):
    from clipheads.models.random_init import save_hf, tiny_model

    model = save_hf(tiny_model("hf"), tmp_path / "tiny")
    social_counterfactuals().to_parquet(tmp_path / "train-00000-of-00001.parquet")
    metrics = {}
    for name, data in (("hf", tmp_path / "train-00000-of-00001.parquet"), ("json", as_json)):
        code, _, err = run_main("eval", "-t", "bias", "--data", data, "--model", model, "--skew-k", "2",
                                "--out", tmp_path / f"{name}.json")
        assert code == 0, err
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
    assert metrics["hf"] == metrics["json"]


@pytest.mark.parametrize(("text", "values", "neutral"), [
    ("A photo of an Asian man chef", ["Asian", "man"], "A photo of a chef"),
    ("A photo of a Black woman accountant", ["Black", "woman"], "A photo of an accountant"),
    ("a photo of a middle-aged man nurse", ["middle-aged", "man"], "a photo of a nurse"),
    ("A photo of a human man chef", ["man"], "A photo of a human chef")])
def test_neutral_text_removes_whole_attribute_words(text, values, neutral):
    assert neutral_text(text, values) == neutral


def test_captions_that_keep_an_attribute_after_derivation_warn(tmp_path: Path, caplog):
    table = social_counterfactuals()
    captions = [text.replace("woman", "female") for text in table["caption"]]  # values say woman, captions female
    table.remove_columns(["caption"]).add_column("caption", captions).to_parquet(tmp_path / "cf.parquet")
    with caplog.at_level("WARNING"):
        dataset = load_counterfactual(tmp_path / "cf.parquet")
    assert "differ beyond their attribute values" in caplog.text and "--queries" in caplog.text
    assert "A photo of a female doctor" in dataset.queries  # what the warning is about
