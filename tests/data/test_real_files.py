"""Files as real tools write them: Excel's BOM, tab-separated .csv, ragged rows, hidden folders, EXIF orientation,
wrong JSON value types, duplicate images and broken template files; each example with its right value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from clipheads.data import (
    load_caption_selection,
    load_classification,
    load_compositional,
    load_counterfactual,
    load_retrieval,
    load_templates,
    read_image,
)
from clipheads.errors import DataError

from .conftest import write_images, write_json


def test_csv_with_utf8_bom_reads_its_first_column(image_dir: Path):
    path = image_dir / "excel.csv"
    path.write_bytes("image,caption\nimg/0.png,a cat\nimg/1.png,a dog\n".encode("utf-8-sig"))
    dataset = load_retrieval(path)
    assert dataset.captions == [["a cat"], ["a dog"]]
    path.write_bytes("image,label\nimg/0.png,cat\nimg/1.png,dog\n".encode("utf-8-sig"))
    assert load_classification(path).classnames == ["cat", "dog"]


def test_tab_separated_file_named_csv_is_split_on_tabs(image_dir: Path):
    path = image_dir / "train.csv"  # open_clip's default: --csv-separator "\t" under a .csv name
    path.write_text("filepath\ttitle\nimg/0.png\ta cat, sitting\nimg/1.png\ta dog\n")
    dataset = load_retrieval(path)
    assert dataset.image_paths == [image_dir / "img" / "0.png", image_dir / "img" / "1.png"]
    assert dataset.captions == [["a cat, sitting"], ["a dog"]]


def test_row_with_more_fields_than_the_header_is_one_line_with_its_number(image_dir: Path):
    path = image_dir / "c.csv"
    path.write_text("image,caption\nimg/0.png,a cat\nimg/1.png,a dog, running\n")
    with pytest.raises(DataError, match=r"c\.csv' line 3: 3 fields but the header has 2") as info:
        load_retrieval(path)
    assert "\n" not in str(info.value)


def test_not_utf8_table_is_one_line(image_dir: Path):
    path = image_dir / "latin.csv"
    path.write_bytes("image,caption\nimg/0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_retrieval(path)


@pytest.fixture(scope="module")
def world_split(tmp_path_factory) -> tuple[Path, Path]:
    """The issue's example: the bundled model on a 50-image, 6-class world split (acc1 0.240)."""
    from clipheads.world.make import WorldSizes, make_world

    sizes = WorldSizes(train=0, val_ood=0, test_ood=50, test_iid=0, test_anti=0, compositional=0, counterfactual=0)
    paths = make_world(tmp_path_factory.mktemp("world"), sizes=sizes, progress=False)
    return paths.classification["test_ood"], paths.templates


def test_hidden_ipynb_checkpoints_is_not_a_class(world_split):
    import clipheads
    from clipheads.eval import evaluate_zeroshot

    folder, templates = world_split
    model = clipheads.load("bundled")
    clean = evaluate_zeroshot(model, load_classification(folder, templates=templates))
    assert clean.acc1 == 0.24  # 12 of 50, an exact fraction
    hidden = folder / ".ipynb_checkpoints"
    hidden.mkdir()
    first = next((folder / "circle").iterdir())
    shutil.copy(first, hidden / "circle-checkpoint.png")
    shutil.copy(first, folder / "circle" / ".hidden.png")
    try:
        dataset = load_classification(folder, templates=templates)
        assert dataset.classnames == ["circle", "cross", "diamond", "square", "star", "triangle"]
        assert len(dataset) == 50
        assert evaluate_zeroshot(model, dataset).acc1 == 0.24
    finally:
        shutil.rmtree(hidden)
        (folder / "circle" / ".hidden.png").unlink()


def test_empty_class_folder_is_refused(tmp_path: Path):
    write_images(tmp_path / "tree" / "cat", ["a.png"])
    (tmp_path / "tree" / "dog").mkdir()
    (tmp_path / "tree" / "dog" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="class folder\\(s\\) 'dog' hold no image"):
        load_classification(tmp_path / "tree")


def test_exif_orientation_is_applied(tmp_path: Path):
    """A phone's portrait photo: pixels stored landscape (40 x 20) with orientation 6 (rotate 90 degrees)."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red on the stored left = the top of the upright picture
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "portrait.jpg")
    assert image.size == (20, 40)  # portrait, as a viewer shows it
    top, bottom = image.getpixel((10, 2)), image.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_transparency_and_16_bit_arrive_as_seen(tmp_path: Path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert read_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # on white, not black
    Image.new("I;16", (4, 4), 65535).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)  # full scale, not clipped


@pytest.mark.parametrize("entry,message", [
    ({"filename": "0.png", "sentences": None}, "image entry 0: field 'sentences': input should be a valid list"),
    ({"filename": 5, "sentences": [{"raw": "a"}]}, "image entry 0: field 'filename': input should be a valid string"),
    ({"filename": "0.png", "sentences": [{"raw": 7}]},
     "image entry 0: field 'sentences.0.raw': input should be a valid string"),
])
def test_karpathy_wrong_types_are_one_line(image_dir: Path, entry: dict, message: str):
    path = write_json(image_dir / "k.json", {"images": [{**entry, "filepath": "img", "split": "test"}]})
    with pytest.raises(DataError, match=message.replace(".", r"\.")) as info:
        load_retrieval(path, split="test")
    assert "\n" not in str(info.value)


def test_karpathy_entry_of_another_split_is_checked_and_numbered_as_in_the_file(image_dir: Path):
    """A "split": 5 left its image out of every split silently (recall over the others); an error in a test entry was
    numbered within the split, not the file."""
    images = [{"filename": "0.png", "filepath": "img", "split": "train", "sentences": [{"raw": "a cat"}]},
              {"filename": "1.png", "filepath": "img", "split": 5, "sentences": [{"raw": "a dog"}]}]
    with pytest.raises(DataError, match="image entry 1: field 'split': input should be a valid string"):
        load_retrieval(write_json(image_dir / "k.json", {"images": images}), split="train")
    images[1] = {"filename": "1.png", "filepath": "img", "split": "test", "sentences": None}
    with pytest.raises(DataError, match="image entry 1: field 'sentences'"):
        load_retrieval(write_json(image_dir / "k.json", {"images": images}), split="test")


def test_image_listed_twice_is_merged_in_every_reader(image_dir: Path):
    twice = {"images": [
        {"filename": "0.png", "filepath": "img", "split": "test", "sentences": [{"raw": "a cat"}]},
        {"filename": "1.png", "filepath": "img", "split": "test", "sentences": [{"raw": "a dog"}]},
        {"filename": "0.png", "filepath": "img", "split": "test", "sentences": [{"raw": "a small cat"}]}]}
    karpathy = load_retrieval(write_json(image_dir / "k.json", twice), split="test")
    (image_dir / "c.csv").write_text("image,caption\nimg/0.png,a cat\nimg/1.png,a dog\nimg/0.png,a small cat\n")
    table = load_retrieval(image_dir / "c.csv")
    coco = {"images": [{"id": 1, "file_name": "img/0.png"}, {"id": 2, "file_name": "img/1.png"},
                       {"id": 3, "file_name": "img/0.png"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}, {"id": 2, "image_id": 2, "caption": "a dog"},
                            {"id": 3, "image_id": 3, "caption": "a small cat"}]}
    from_coco = load_retrieval(write_json(image_dir / "coco.json", coco))
    for dataset in (karpathy, table, from_coco):
        assert dataset.image_paths == [image_dir / "img" / "0.png", image_dir / "img" / "1.png"]
        assert dataset.captions == [["a cat", "a small cat"], ["a dog"]]


@pytest.mark.parametrize("item,message", [
    ({"candidates": 3, "answer": 0}, "field 'candidates': input should be a valid list"),
    ({"candidates": "ab", "answer": 0}, "field 'candidates': input should be a valid list"),
    ({"candidates": ["a", 2], "answer": 0}, "field 'candidates.1': input should be a valid string"),
    ({"candidates": ["a", "b"], "answer": 0.7}, "field 'answer': input should be a valid integer"),
    ({"candidates": ["a", "b"], "answer": -1}, "field 'answer': input should be greater than or equal to 0"),
])
def test_caption_selection_wrong_types_are_one_line(image_dir: Path, item: dict, message: str):
    path = write_json(image_dir / "s.json", [{"image": "img/0.png", "candidates": ["x", "y"], "answer": 1},
                                             {"image": "img/1.png", **item}])
    with pytest.raises(DataError, match=f"item 1: {message}"):
        load_caption_selection(path)


def test_compositional_and_counterfactual_wrong_types(image_dir: Path):
    path = write_json(image_dir / "c.json", [{"images": ["img/0.png", "img/1.png"], "captions": ["a", 3]}])
    with pytest.raises(DataError, match="item 0 .*field 'captions.1': input should be a valid string"):
        load_compositional(path)
    data = {"queries": ["a person"], "images": [{"image": 4, "group": "g", "attribute": "a", "value": "x"}]}
    with pytest.raises(DataError, match="image entry 0: field 'image': input should be a valid string"):
        load_counterfactual(write_json(image_dir / "b.json", data))


@pytest.mark.parametrize("line", ["a photo of a {0} and {1}.", "a {name}.", "a photo of a {.", "a {} {}"])
def test_templates_str_format_cannot_fill_are_one_line(tmp_path: Path, line: str):
    (tmp_path / "t.txt").write_text(f"a photo of a {{}}.\n{line}\n")
    with pytest.raises(DataError, match="t.txt' line 2: ") as info:
        load_templates(tmp_path / "t.txt")
    assert "\n" not in str(info.value)


def test_templates_not_utf8_and_literal_braces(tmp_path: Path):
    (tmp_path / "t.txt").write_bytes("une photo d'un {} \xe9l\xe9gant.\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_templates(tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("a {} in {{braces}}\n")
    assert [t.format("cat") for t in load_templates(tmp_path / "t.txt")] == ["a cat in {braces}"]
