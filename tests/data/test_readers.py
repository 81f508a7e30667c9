"""Every dataset format parsed from small files written here, and every bad input refused with a clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipheads.data import (
    DEFAULT_TEMPLATES,
    load_caption_selection,
    load_classification,
    load_compositional,
    load_counterfactual,
    load_dataset,
    load_retrieval,
    load_templates,
)
from clipheads.errors import DataError

from .conftest import write_images, write_json

KARPATHY = {"dataset": "flickr30k", "images": [
    {"filename": "0.png", "filepath": "img", "split": "test", "imgid": 0,
     "sentences": [{"raw": "a cat"}, {"raw": "b"}]},
    {"filename": "1.png", "filepath": "img", "split": "train", "imgid": 1, "sentences": [{"raw": "a dog"}]},
    {"filename": "2.png", "filepath": "img", "split": "test", "imgid": 2,
     "sentences": [{"tokens": ["一只", "猫"]}, {"raw": "三 只 狗"}]},
]}


def test_karpathy_split_paths_and_captions(image_dir: Path):
    dataset = load_retrieval(write_json(image_dir / "dataset_flickr30k.json", KARPATHY), split="test")
    assert dataset.image_paths == [image_dir / "img" / "0.png", image_dir / "img" / "2.png"]
    assert dataset.texts == ["a cat", "b", "一只 猫", "三 只 狗"]
    assert dataset.text_to_image == [0, 0, 1, 1]
    assert (dataset.format, dataset.name, dataset.split) == ("karpathy", "flickr30k", "test")
    assert len(load_retrieval(image_dir / "dataset_flickr30k.json")) == 3  # no split: every image
    assert load_dataset("retrieval", image_dir / "dataset_flickr30k.json", split="train").texts == ["a dog"]


def test_karpathy_refuses_empty_split_and_image_without_captions(image_dir: Path):
    path = write_json(image_dir / "k.json", KARPATHY)
    with pytest.raises(DataError, match=r"no images in split 'val' \(splits present: test, train\)"):
        load_retrieval(path, split="val")
    bad = {"images": [{**KARPATHY["images"][0], "sentences": []}]}
    with pytest.raises(DataError, match="0.png' has no caption"):
        load_retrieval(write_json(image_dir / "bad.json", bad), split="test")


def test_coco_captions_grouped_per_image_and_image_folder_found(tmp_path: Path):
    write_images(tmp_path / "val2014", ["COCO_1.png", "COCO_2.png"])
    (tmp_path / "annotations").mkdir()
    data = {"images": [{"id": 7, "file_name": "COCO_1.png"}, {"id": 9, "file_name": "COCO_2.png"}],
            "annotations": [{"id": 1, "image_id": 9, "caption": "two"}, {"id": 2, "image_id": 7, "caption": "one"},
                            {"id": 3, "image_id": 9, "caption": "deux"}]}
    dataset = load_retrieval(write_json(tmp_path / "annotations" / "captions_val2014.json", data), split="test")
    assert dataset.format == "coco"
    assert dataset.image_paths == [tmp_path / "val2014" / "COCO_1.png", tmp_path / "val2014" / "COCO_2.png"]
    assert dataset.captions == [["one"], ["two", "deux"]]
    data["annotations"].append({"id": 4, "image_id": 3, "caption": "orphan"})
    with pytest.raises(DataError, match="caption 4 belongs to image_id 3, which is not in 'images'"):
        load_retrieval(write_json(tmp_path / "annotations" / "captions_val2014.json", data))
    data["annotations"] = data["annotations"][:1]
    with pytest.raises(DataError, match="COCO_1.png' has no caption"):
        load_retrieval(write_json(tmp_path / "annotations" / "captions_val2014.json", data))


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_retrieval(image_dir: Path, suffix: str, sep: str):
    rows = ["image,caption,split", "img/0.png,a cat,test", "img/1.png,a dog,train", "img/0.png,a small cat,test"]
    path = image_dir / f"captions{suffix}"
    path.write_text("\n".join(r.replace(",", sep) for r in rows) + "\n")
    dataset = load_retrieval(path, split="test")
    assert dataset.image_paths == [image_dir / "img" / "0.png"]
    assert dataset.captions == [["a cat", "a small cat"]]
    assert len(load_retrieval(path)) == 2


def test_csv_retrieval_bad_inputs(image_dir: Path):
    path = image_dir / "c.csv"
    path.write_text("image,caption\nimg/0.png,\n")
    with pytest.raises(DataError, match="line 2: empty caption"):
        load_retrieval(path)
    path.write_text("file,words\nimg/0.png,a cat\n")
    with pytest.raises(DataError, match="has no image/filepath/filename/path column"):
        load_retrieval(path)
    path.write_text("image,caption,split\nimg/0.png,a cat,train\n")
    with pytest.raises(DataError, match="no rows in split 'test'"):
        load_retrieval(path, split="test")
    with pytest.raises(DataError, match="does not exist"):
        load_retrieval(image_dir / "missing.json")
    with pytest.raises(DataError, match=r"is a folder, not a dataset file; dataset files there: c\.csv"):
        load_retrieval(image_dir)
    write_json(image_dir / "other.json", {"hello": 1})
    with pytest.raises(DataError, match="neither a Karpathy"):
        load_retrieval(image_dir / "other.json")


def test_image_folder_classes_templates_and_names(tmp_path: Path):
    write_images(tmp_path / "tree" / "golden_retriever", ["a.png", "b.png"])
    write_images(tmp_path / "tree" / "cat", ["c.png"])
    dataset = load_classification(tmp_path / "tree")
    assert dataset.classnames == ["cat", "golden retriever"]
    assert dataset.labels == [0, 1, 1]
    assert dataset.templates == load_templates()
    assert dataset.prompts()[len(dataset.templates)] == dataset.templates[0].format("golden retriever")
    (tmp_path / "t.txt").write_text("# comment\na photo of a {c}.\n\nitap of a {}\n")
    (tmp_path / "names.txt").write_text("kitty\ndoggo\n")
    custom = load_classification(tmp_path / "tree", templates=tmp_path / "t.txt", classnames=tmp_path / "names.txt")
    assert custom.templates == ["a photo of a {}.", "itap of a {}"]
    assert custom.classnames == ["kitty", "doggo"]
    (tmp_path / "names.txt").write_text("kitty\n")
    with pytest.raises(DataError, match="1 class names given for 2 classes"):
        load_classification(tmp_path / "tree", classnames=tmp_path / "names.txt")
    (tmp_path / "t.txt").write_text("a photo\n")
    with pytest.raises(DataError, match="line 1: a template needs exactly one"):
        load_templates(tmp_path / "t.txt")


def test_default_templates_ship_with_the_package():
    templates = load_templates(DEFAULT_TEMPLATES)
    assert len(templates) >= 10 and all(t.count("{}") == 1 for t in templates)


def test_classification_csv_names_and_integer_labels(image_dir: Path):
    (image_dir / "l.csv").write_text("image,label\nimg/0.png,dog\nimg/1.png,cat\nimg/2.png,dog\n")
    dataset = load_classification(image_dir / "l.csv")
    assert (dataset.classnames, dataset.labels) == (["cat", "dog"], [1, 0, 1])
    (image_dir / "i.csv").write_text("image,label\nimg/0.png,1\nimg/1.png,0\n")
    named = load_classification(image_dir / "i.csv", classnames=["zero", "one"], templates=["{}"])
    assert (named.classnames, named.labels, named.prompts()) == (["zero", "one"], [1, 0], ["zero", "one"])
    (image_dir / "empty").mkdir()
    with pytest.raises(DataError, match="has no images in class sub-folders"):
        load_classification(image_dir / "empty")


def test_caption_selection_json_single_object_and_csv(image_dir: Path):
    items = [{"image": "img/0.png", "candidates": ["a", "b", "c"], "answer": 2, "extra": 1},
             {"image": "img/1.png", "candidates": ["d", "e"], "answer": 0}]
    dataset = load_caption_selection(write_json(image_dir / "s.json", items))
    assert dataset.candidates == [["a", "b", "c"], ["d", "e"]] and dataset.answers == [2, 0]
    single = load_caption_selection(write_json(image_dir / "one.json", items[0]))
    assert len(single) == 1 and single.image_paths == [image_dir / "img" / "0.png"]
    (image_dir / "s.csv").write_text("image,caption_0,caption_1,caption_2,answer\n"
                                     "img/0.png,x,y,z,1\nimg/1.png,u,v,,0\n")
    table = load_caption_selection(image_dir / "s.csv")
    assert table.candidates == [["x", "y", "z"], ["u", "v"]] and table.answers == [1, 0]
    with pytest.raises(DataError, match="has answer 3 but 3 candidates"):
        load_caption_selection(write_json(image_dir / "bad.json", [{**items[0], "answer": 3}]))
    with pytest.raises(DataError, match="item 0: field 'candidates': field required"):
        load_caption_selection(write_json(image_dir / "bad.json", [{"image": "x.png"}]))


def test_compositional_pairs(image_dir: Path):
    items = [{"images": ["img/0.png", "img/1.png"], "captions": ["red left", "red right"]}]
    dataset = load_compositional(write_json(image_dir / "c.json", items))
    assert dataset.image_pairs == [(image_dir / "img" / "0.png", image_dir / "img" / "1.png")]
    assert dataset.caption_pairs == [("red left", "red right")]
    with pytest.raises(DataError, match=r"item 0 \(2 'images' .*field 'images': list should have at least 2 items"):
        load_compositional(write_json(image_dir / "c.json", [{"images": ["img/0.png"], "captions": ["a", "b"]}]))
    with pytest.raises(DataError, match="has no pairs"):
        load_compositional(write_json(image_dir / "c.json", []))


def test_counterfactual_groups(image_dir: Path):
    data = {"queries": ["a photo of a person"], "images": [
        {"image": "img/0.png", "group": "g0", "attribute": "colour", "value": "red"},
        {"image": "img/1.png", "group": "g0", "attribute": "colour", "value": "blue"},
        {"image": "img/2.png", "group": "g1", "attribute": "size", "value": "small"},
        {"image": "img/3.png", "group": "g1", "attribute": "size", "value": "large"}]}
    dataset = load_counterfactual(write_json(image_dir / "b.json", data))
    assert dataset.to_dict()["attributes"] == ["colour", "size"] and dataset.values[1] == "blue"
    data["images"][3]["attribute"] = "colour"
    with pytest.raises(DataError, match="group 'g1' varies both 'size' and 'colour'"):
        load_counterfactual(write_json(image_dir / "b.json", data))
    with pytest.raises(DataError, match="has no neutral 'queries'"):
        load_counterfactual(write_json(image_dir / "b.json", {"queries": [], "images": data["images"][:2]}))
