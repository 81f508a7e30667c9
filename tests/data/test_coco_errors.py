"""Malformed COCO captions files are reported as what they are."""

from __future__ import annotations

import json

import pytest

from clipheads.data import load_retrieval
from clipheads.errors import DataError

IMAGES = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]
CAPTIONS = [{"id": 10, "image_id": 1, "caption": "a cat"}, {"id": 11, "image_id": 2, "caption": "a dog"}]


def _write(tmp_path, data) -> str:
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_sound_coco_file_reads(tmp_path):
    dataset = load_retrieval(_write(tmp_path, {"images": IMAGES, "annotations": CAPTIONS}))
    assert dataset.format == "coco" and dataset.captions == [["a cat"], ["a dog"]]


def test_two_images_with_one_id(tmp_path):
    images = [*IMAGES, {"id": 1, "file_name": "c.png"}]
    with pytest.raises(DataError, match=r"image id 1 is given twice in 'images' \(entries 0 and 2: 'a.png' and "
                                        r"'c.png'\); ids must be unique"):
        load_retrieval(_write(tmp_path, {"images": images, "annotations": CAPTIONS}))


@pytest.mark.parametrize("annotations", [{"0": CAPTIONS[0]}, "a cat", 3])
def test_annotations_that_are_not_a_list(tmp_path, annotations):
    with pytest.raises(DataError, match=r"COCO 'annotations' must be a list of captions; it is a "
                                        f"{type(annotations).__name__}"):
        load_retrieval(_write(tmp_path, {"images": IMAGES, "annotations": annotations}))


@pytest.mark.parametrize(("data", "message"), [
    ({"images": {"1": IMAGES[0]}, "annotations": CAPTIONS}, "COCO 'images' must be a list of images; it is a dict"),
    ({"images": [{"file_name": "a.png"}], "annotations": []}, "image 0: field 'id'"),
    ({"images": IMAGES, "annotations": [{"image_id": 1}]}, "annotation 0: field 'caption'"),
    ({"images": IMAGES, "annotations": [{"image_id": 7, "caption": "x", "id": 3}]}, "image_id 7, which is not in"),
    ({"images": IMAGES, "annotations": CAPTIONS, "info": "COCO"}, None),  # a non-object 'info' is ignored
])
def test_other_malformed_coco_fields(tmp_path, data, message):
    if message is None:
        assert len(load_retrieval(_write(tmp_path, data))) == 2
        return
    with pytest.raises(DataError, match=message):
        load_retrieval(_write(tmp_path, data))
