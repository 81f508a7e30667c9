"""Every reader of data as users have it (Hugging Face parquet and save_to_disk, webdataset shards, clip_benchmark's
Flickr txt, ImageNet as distributed) gives the same metrics as the same images in Karpathy or ImageFolder form."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipheads.data import load_classification, load_retrieval, load_templates
from clipheads.data.sources import detect_source
from clipheads.errors import DataError
from clipheads.eval import FeatureCache, evaluate_retrieval, evaluate_zeroshot

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30), (20, 20, 20), (240, 240, 240)]
WORDS = ["red", "green", "blue", "yellow", "black", "white"]
CAPTIONS = [[f"a {w} square", f"a photo of {w}, bright"] for w in WORDS]
WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark (ImageNet indices 0, 1, 2)


def png(i: int) -> bytes:
    image = Image.new("RGB", (32, 32), COLOURS[i])
    image.paste((255 - COLOURS[i][0], 128, COLOURS[i][2] // 2), (4 * i, 4, 4 * i + 8, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def karpathy(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(png(i))  # PNG bytes under .jpg: Pillow reads by content
    images = [{"filename": f"{i}.jpg", "filepath": "img", "split": "test", "sentences": [{"raw": c} for c in caps]}
              for i, caps in enumerate(CAPTIONS)]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return tmp_path / "dataset_flickr30k.json"


def retrieval_metrics_of(model, dataset):
    return evaluate_retrieval(model, dataset, cache=FeatureCache()).metrics


def test_parquet_file_and_save_to_disk_folder_equal_karpathy(tiny_hf, karpathy: Path, tmp_path: Path):
    import datasets

    expected = retrieval_metrics_of(tiny_hf, load_retrieval(karpathy, split="test"))
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    table = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(6)],
                                        "captions": CAPTIONS}, features=features)
    table.to_parquet(tmp_path / "test-00000-of-00001.parquet")
    datasets.DatasetDict({"test": table, "train": table.select([0])}).save_to_disk(tmp_path / "saved")
    one_caption = datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(6)],
                                              "caption": [c[0] for c in CAPTIONS]},
                                             features=datasets.Features({"image": datasets.Image(),
                                                                         "caption": datasets.Value("string")}))
    one_caption.to_parquet(tmp_path / "single.parquet")

    assert detect_source(tmp_path / "test-00000-of-00001.parquet") == "hf"
    assert detect_source(tmp_path / "saved") == "hf"
    from_parquet = load_retrieval(tmp_path / "test-00000-of-00001.parquet", split="test")
    assert from_parquet.format == "hf" and from_parquet.captions == CAPTIONS
    assert retrieval_metrics_of(tiny_hf, from_parquet) == expected
    saved = load_retrieval(tmp_path / "saved", split="test")
    assert retrieval_metrics_of(tiny_hf, saved) == expected
    assert len(load_retrieval(tmp_path / "saved", split="train")) == 1
    single = load_retrieval(tmp_path / "single.parquet")
    assert single.captions == [[c[0]] for c in CAPTIONS]
    with pytest.raises(DataError, match="has splits test, train; choose one with --split"):
        load_retrieval(tmp_path / "saved")
    with pytest.raises(DataError, match="has no column 'words' \\(columns: image, captions\\)"):
        load_retrieval(tmp_path / "test-00000-of-00001.parquet", text_column="words")


def test_hf_split_column_selects_the_karpathy_split(tiny_hf, karpathy: Path, tmp_path: Path):
    """nlphuji/flickr30k's layout: one Hub split 'test' of every image, the Karpathy split in a 'split' column; --split
    test reads the test rows only (was: all rows, a different recall)."""
    import datasets

    expected = retrieval_metrics_of(tiny_hf, load_retrieval(karpathy, split="test"))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
                                  "split": datasets.Value("string")})
    images = [{"bytes": png(i), "path": None} for i in range(6)]
    table = datasets.Dataset.from_dict({"image": images + images[:2], "caption": CAPTIONS + CAPTIONS[:2],
                                        "split": ["test"] * 6 + ["train"] * 2}, features=features)
    (tmp_path / "data").mkdir()
    table.to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    test = load_retrieval(tmp_path, split="test")
    assert test.captions == CAPTIONS and retrieval_metrics_of(tiny_hf, test) == expected
    assert load_retrieval(tmp_path, split="train").captions == CAPTIONS[:2]


def test_hf_classification_with_classlabel_equals_image_folder(tiny_hf, tmp_path: Path):
    import datasets

    for i, word in enumerate(WORDS[:3] * 2):
        (tmp_path / "tree" / word).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / word / f"{i}.png").write_bytes(png(i))
    folder = load_classification(tmp_path / "tree", templates=["a {} square"])
    labels = folder.labels
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classnames)})
    table = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in folder.image_paths],
                                        "label": labels}, features=features)
    table.save_to_disk(tmp_path / "saved")
    dataset = load_classification(tmp_path / "saved", templates=["a {} square"])
    assert dataset.classnames == folder.classnames == ["blue", "green", "red"]
    assert dataset.labels == labels and dataset.format == "hf"
    expected = evaluate_zeroshot(tiny_hf, folder, cache=FeatureCache()).metrics
    assert evaluate_zeroshot(tiny_hf, dataset, cache=FeatureCache()).metrics == pytest.approx(expected, nan_ok=True)


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for sample in samples:
            for name, payload in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_in_clip_benchmark_layout_equal_karpathy(tiny_hf, karpathy: Path, tmp_path: Path):
    expected = retrieval_metrics_of(tiny_hf, load_retrieval(karpathy, split="test"))
    root = tmp_path / "wds_flickr30k"
    for shard in range(2):
        write_shard(root / "test" / f"{shard}.tar",
                    [{f"s{i:04d}.png": png(i), f"s{i:04d}.txt": "\n".join(CAPTIONS[i]).encode()}
                     for i in range(3 * shard, 3 * shard + 3)])
    (root / "test" / "nshards.txt").write_text("2")
    assert detect_source(root, "test") == "wds"
    for given in (root, root / "test" / "{0..1}.tar", root / "test" / "*.tar"):
        dataset = load_retrieval(given, split="test")
        assert dataset.format == "wds" and dataset.captions == CAPTIONS
        assert retrieval_metrics_of(tiny_hf, dataset) == expected
    with pytest.raises(DataError, match="has no shards for split 'val' \\(splits with shards: test\\)"):
        load_retrieval(root, split="val")


def test_webdataset_classification_uses_its_classnames_and_templates(tiny_hf, tmp_path: Path):
    root = tmp_path / "wds_colours"
    write_shard(root / "test" / "0.tar", [{f"{i}.png": png(i), f"{i}.cls": str(i % 3).encode()} for i in range(6)])
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c} square\na photo of {c}\n")
    dataset = load_classification(root, split="test")
    assert (dataset.classnames, dataset.labels) == (["red", "green", "blue"], [0, 1, 2, 0, 1, 2])
    assert dataset.templates == ["a {} square", "a photo of {}"]
    for i in range(6):
        (tmp_path / "tree" / ["red", "green", "blue"][i % 3]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / ["red", "green", "blue"][i % 3] / f"{i}.png").write_bytes(png(i))
    folder = load_classification(tmp_path / "tree", templates=dataset.templates,
                                 classnames=["blue", "green", "red"])
    ours = evaluate_zeroshot(tiny_hf, dataset, cache=FeatureCache()).metrics
    theirs = evaluate_zeroshot(tiny_hf, folder, cache=FeatureCache()).metrics
    assert ours == pytest.approx(theirs, nan_ok=True)


def test_clip_benchmark_flickr_txt_equals_karpathy(tiny_hf, karpathy: Path):
    root = karpathy.parent
    lines = ["image,caption"] + [f"{i}.jpg,{c}" for i, caps in enumerate(CAPTIONS) for c in caps]
    (root / "img" / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    dataset = load_retrieval(root / "img" / "flickr30k_test_karpathy.txt")
    assert dataset.captions == CAPTIONS  # "a photo of red, bright": the comma stays in the caption
    assert (dataset.format, dataset.split) == ("clip_benchmark_txt", "test")
    expected = retrieval_metrics_of(tiny_hf, load_retrieval(karpathy, split="test"))
    assert retrieval_metrics_of(tiny_hf, dataset) == expected
    assert load_retrieval(root / "img", split="test").captions == CAPTIONS  # clip_benchmark's root folder
    (root / "img" / "flickr30k_val_karpathy.txt").write_text("image,caption\n0.jpg\n")
    with pytest.raises(DataError, match="line 2: expected image.jpg,caption"):
        load_retrieval(root / "img", split="val")


def test_flickr_txt_finds_images_in_kaggles_subfolder(tiny_hf, karpathy: Path, tmp_path: Path):
    """Kaggle's Flickr30k archive (adityajn105/flickr30k) keeps its images in Images/, beside which users put
    clip_benchmark's annotation file: was "image 'flickr/0.jpg' does not exist"."""
    root = tmp_path / "flickr"
    (root / "Images").mkdir(parents=True)
    for i in range(6):
        (root / "Images" / f"{i}.jpg").write_bytes(png(i))
    lines = ["image,caption"] + [f"{i}.jpg,{c}" for i, caps in enumerate(CAPTIONS) for c in caps]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    dataset = load_retrieval(root, split="test")
    assert dataset.image_paths[0] == root / "Images" / "0.jpg"
    expected = retrieval_metrics_of(tiny_hf, load_retrieval(karpathy, split="test"))
    assert retrieval_metrics_of(tiny_hf, dataset) == expected


def imagenet_images(folder: Path) -> list[int]:
    """Six validation images, two per class; returns their class (0..2 in WNIDS order)."""
    folder.mkdir(parents=True)
    classes = [2, 0, 1, 1, 0, 2]
    for n in range(1, len(classes) + 1):
        (folder / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(png(n - 1))
    return classes


def write_devkit(root: Path, classes: list[int]) -> None:
    import numpy as np
    import scipy.io as sio

    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ilsvrc_ids = [449, 12, 7]  # the devkit numbers classes in its own order, not the sorted-WNID index
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark"]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.array([(ilsvrc_ids[i], WNIDS[i], names[i], "", 0) for i in range(3)]
                       + [(1001, "n00000001", "entity", "", 3)], dtype=dtype)
    sio.savemat(str(data / "meta.mat"), {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ilsvrc_ids[c]}\n" for c in classes))


@pytest.mark.parametrize("labels", ["devkit", "loc_csv", "meta_bin"])
def test_imagenet_validation_folder_equals_train_style_folders(tiny_hf, tmp_path: Path, labels: str):
    import torch

    classes = imagenet_images(tmp_path / "val")
    if labels == "devkit":
        write_devkit(tmp_path, classes)
    elif labels == "loc_csv":
        rows = [f"ILSVRC2012_val_{n:08d},{WNIDS[c]} 1 2 30 40" for n, c in enumerate(classes, start=1)]
        (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    else:
        torch.save(({w: (w,) for w in WNIDS}, [WNIDS[c] for c in classes]), tmp_path / "meta.bin")
    assert detect_source(tmp_path / "val") == "imagenet_val"
    dataset = load_classification(tmp_path / "val", templates="openai")
    assert dataset.classnames == ["tench", "goldfish", "great white shark"]  # OpenAI's names, not n01440764
    assert dataset.labels == classes and len(dataset.templates) == 80
    for n, c in enumerate(classes):
        (tmp_path / "train" / WNIDS[c]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / WNIDS[c] / f"{n}.png").write_bytes(png(n))
    folders = load_classification(tmp_path / "train", templates="openai")
    assert folders.classnames == dataset.classnames and folders.prompts()[0] == "a bad photo of a tench."
    ours = evaluate_zeroshot(tiny_hf, dataset, cache=FeatureCache()).metrics
    assert ours == pytest.approx(evaluate_zeroshot(tiny_hf, folders, cache=FeatureCache()).metrics, nan_ok=True)


def test_imagenet_kaggle_layout_finds_loc_val_solution_three_levels_up(tmp_path: Path):
    """Kaggle's ImageNet keeps LOC_val_solution.csv beside ILSVRC/ and the images in ILSVRC/Data/CLS-LOC/val/."""
    val = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    classes = imagenet_images(val)
    rows = [f"ILSVRC2012_val_{n:08d},{WNIDS[c]} 1 2 30 40" for n, c in enumerate(classes, start=1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    assert detect_source(val) == "imagenet_val"
    dataset = load_classification(val, templates="openai")
    assert dataset.classnames == ["tench", "goldfish", "great white shark"] and dataset.labels == classes


def test_imagenet_folder_without_labels_is_one_line(tmp_path: Path):
    imagenet_images(tmp_path / "val")
    with pytest.raises(DataError, match="no labels were found beside it or up to four levels up"):
        load_classification(tmp_path / "val")


def test_openai_templates_preset_is_clip_benchmarks():
    import clip_benchmark

    path = Path(clip_benchmark.__file__).parent / "datasets"
    theirs = json.loads((path / "en_zeroshot_classification_templates.json").read_text())["imagenet1k"]
    assert load_templates("openai") == [t.replace("{c}", "{}") for t in theirs]
    from clipheads.data.imagenet import openai_classnames

    names = json.loads((path / "en_classnames.json").read_text())["imagenet1k"]
    assert list(openai_classnames()) == names


def test_sugar_crepe_file_equals_caption_selection_json(tiny_hf, karpathy: Path, tmp_path: Path):
    from clipheads.data import load_caption_selection
    from clipheads.eval import evaluate_caption_selection

    images = karpathy.parent / "img"
    sugar = {str(k): {"filename": f"{i}.jpg", "caption": CAPTIONS[i][0], "negative_caption": CAPTIONS[(i + 1) % 6][0]}
             for k, i in zip((0, 3, 7, 8, 20, 21), range(6), strict=True)}  # indices may be non-contiguous
    (tmp_path / "replace_att.json").write_text(json.dumps(sugar))
    plain = [{"image": f"img/{i}.jpg", "candidates": [CAPTIONS[i][0], CAPTIONS[(i + 1) % 6][0]], "answer": 0}
             for i in range(6)]
    (karpathy.parent / "plain.json").write_text(json.dumps(plain))
    dataset = load_caption_selection(tmp_path / "replace_att.json", root=images)
    assert dataset.answers == [0] * 6 and dataset.image_paths[2] == images / "2.jpg"
    ours = evaluate_caption_selection(tiny_hf, dataset, cache=FeatureCache()).metrics
    expected = evaluate_caption_selection(tiny_hf, load_caption_selection(karpathy.parent / "plain.json"),
                                          cache=FeatureCache()).metrics
    assert ours == expected
    sugar["7"]["negative_caption"] = None
    (tmp_path / "replace_att.json").write_text(json.dumps(sugar))
    with pytest.raises(DataError, match="item '7': field 'negative_caption': input should be a valid string"):
        load_caption_selection(tmp_path / "replace_att.json", root=images)


def test_winoground_as_a_hugging_face_dataset_equals_pair_json(tiny_hf, tmp_path: Path):
    import datasets

    from clipheads.data import load_compositional
    from clipheads.eval import evaluate_compositional

    pairs = [(0, 1), (2, 3), (4, 5)]
    (tmp_path / "img").mkdir()
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
    (tmp_path / "pairs.json").write_text(json.dumps([{"images": [f"img/{a}.png", f"img/{b}.png"],
                                                      "captions": [CAPTIONS[a][0], CAPTIONS[b][0]]}
                                                     for a, b in pairs]))
    features = datasets.Features({"id": datasets.Value("int32"), "image_0": datasets.Image(),
                                  "image_1": datasets.Image(), "caption_0": datasets.Value("string"),
                                  "caption_1": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"id": list(range(3)),
                                        "image_0": [{"bytes": png(a), "path": None} for a, _ in pairs],
                                        "image_1": [{"bytes": png(b), "path": None} for _, b in pairs],
                                        "caption_0": [CAPTIONS[a][0] for a, _ in pairs],
                                        "caption_1": [CAPTIONS[b][0] for _, b in pairs]}, features=features)
    datasets.DatasetDict({"test": table}).save_to_disk(tmp_path / "winoground")
    dataset = load_compositional(tmp_path / "winoground", split="test")
    assert len(dataset) == 3 and dataset.caption_pairs[1] == (CAPTIONS[2][0], CAPTIONS[3][0])
    ours = evaluate_compositional(tiny_hf, dataset, cache=FeatureCache()).metrics
    expected = evaluate_compositional(tiny_hf, load_compositional(tmp_path / "pairs.json"), cache=FeatureCache())
    assert ours == expected.metrics


def test_hf_rows_of_one_image_are_one_image_as_in_every_reader(tiny_hf, karpathy: Path, tmp_path: Path):
    """COCO-style uploads hold one caption per row: the rows of one image become one image with all its captions
    (its first position), as the Karpathy/COCO/CSV readers do, so an image never competes with itself."""
    import datasets

    expected = retrieval_metrics_of(tiny_hf, load_retrieval(karpathy, split="test"))
    rows = [(i, caption) for j in range(2) for i, caps in enumerate(CAPTIONS) for caption in caps[j:j + 1]]
    for stored in ("bytes", "path"):  # an Image feature with bytes, and one holding only a file path
        if stored == "bytes":
            images = [{"bytes": png(i), "path": None} for i, _ in rows]
        else:
            images = [{"bytes": None, "path": str(karpathy.parent / "img" / f"{i}.jpg")} for i, _ in rows]
        table = datasets.Dataset.from_dict({"image": images, "caption": [c for _, c in rows]},
                                           features=datasets.Features({"image": datasets.Image(),
                                                                       "caption": datasets.Value("string")}))
        table.to_parquet(tmp_path / f"per-caption-{stored}.parquet")
        merged = load_retrieval(tmp_path / f"per-caption-{stored}.parquet")
        assert len(merged) == 6 and merged.captions == CAPTIONS, stored
        assert retrieval_metrics_of(tiny_hf, merged) == expected, stored
