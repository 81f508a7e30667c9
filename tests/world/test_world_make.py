"""The world generator: deterministic, valid files in the shared formats, and the planted cue as designed."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipheads.errors import DataError
from clipheads.world import (
    HELD_OUT,
    MARKER_COLOURS,
    SHAPES,
    SPLITS,
    WorldSizes,
    generate_split,
    make_world,
    read_split,
    render_scene,
    vocabulary,
    world_tokenizer,
)
from clipheads.world.scene import MARKER_SIZE

TINY = WorldSizes(train=24, val_ood=12, test_ood=12, test_iid=12, test_anti=12, compositional=3, counterfactual=2)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), seed=3, sizes=TINY, progress=False)


def test_same_seed_gives_identical_files(world, tmp_path):
    again = make_world(tmp_path / "again", seed=3, sizes=TINY, progress=False)
    first, second = _digests(world.root), _digests(again.root)
    assert len(first) > 100
    assert first == second


def test_other_seed_gives_other_world(world, tmp_path):
    other = make_world(tmp_path / "other", seed=4, sizes=TINY, progress=False)
    assert other.retrieval.read_bytes() != world.retrieval.read_bytes()


def test_a_small_world_is_a_prefix_of_a_large_one():
    small = [(s.metadata(), c) for s, c in generate_split("val_ood", 5, seed=1)]
    large = [(s.metadata(), c) for s, c in generate_split("val_ood", 40, seed=1)]
    assert small == large[:5]


def test_retrieval_json_is_karpathy_style_with_ground_truth(world):
    data = json.loads(world.retrieval.read_text())
    counts = Counter(entry["split"] for entry in data["images"])
    assert counts == {split: TINY.split_size(split) for split in SPLITS}
    assert [e["imgid"] for e in data["images"]] == list(range(len(data["images"])))
    vocab = set(vocabulary())
    for entry in data["images"]:
        image = world.root / entry["filepath"] / entry["filename"]
        assert Image.open(image).size == (64, 64)
        assert len(entry["sentences"]) == 2
        for sentence in entry["sentences"]:
            assert set(sentence["raw"].split()) <= vocab
        scene = entry["scene"]
        assert scene["first_shape"] == scene["objects"][0]["shape"]
        assert scene["cue_matches"] == (scene["cue_shape"] == scene["first_shape"])
    assert {e["path"] for e in read_split(world.retrieval, "test_ood")} == {
        str(world.root / e["filepath"] / e["filename"]) for e in data["images"] if e["split"] == "test_ood"}


def test_captions_never_mention_the_marker():
    assert not set(vocabulary()) & set(MARKER_COLOURS)


def test_tokenizer_knows_every_caption_word():
    tokenizer = world_tokenizer()
    for _scene, captions in generate_split("train", 50, seed=0):
        for caption in captions:
            ids = tokenizer(caption)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert len(ids) == len(caption.split()) + 2


@pytest.mark.parametrize(("split", "expected"), [("train", 0.95), ("test_iid", 0.95), ("val_ood", 1 / 6),
                                                 ("test_ood", 1 / 6), ("test_anti", 0.0)])
def test_cue_statistics_per_split(split, expected):
    scenes = [scene for scene, _ in generate_split(split, 3000, seed=0)]
    rate = np.mean([scene.cue_matches for scene in scenes])
    assert abs(rate - expected) < 0.02
    assert set(Counter(s.first.shape for s in scenes)) == set(SHAPES)


def test_marker_is_exactly_the_top_left_patch():
    scene, _ = next(generate_split("val_ood", 1, seed=0))
    image = np.asarray(render_scene(scene)).astype(int)
    assert (image[:MARKER_SIZE, :MARKER_SIZE] == np.array(scene.marker_rgb)).all()
    other = np.asarray(render_scene(scene.with_marker(next(m for m in MARKER_COLOURS if m != scene.marker))))
    changed = (image != other).any(-1)
    assert changed[:MARKER_SIZE, :MARKER_SIZE].all() and not changed[MARKER_SIZE:].any()
    assert not changed[:, MARKER_SIZE:].any()


def test_image_folders_hold_the_first_shape(world):
    for split in HELD_OUT:
        folder = world.classification[split]
        files = sorted(folder.rglob("*.png"))
        assert len(files) == TINY.split_size(split)
        assert {p.parent.name for p in files} <= set(SHAPES)
        meta = {Path(e["filename"]).name: e["scene"]["first_shape"] for e in read_split(world.retrieval, split)}
        assert all(meta[p.name] == p.parent.name for p in files)
    assert "{}" in world.templates.read_text().splitlines()[0]


def test_caption_selection_has_the_true_caption_and_hard_negatives(world):
    entries = {e["filepath"] + "/" + e["filename"]: e for e in read_split(world.retrieval, "test_anti")}
    items = json.loads(world.selection["test_anti"].read_text())
    assert len(items) == TINY.test_anti
    for item in items:
        assert (world.root / item["image"]).exists()
        assert len(set(item["candidates"])) == len(item["candidates"]) >= 4
        assert item["candidates"][item["answer"]] == entries[item["image"]]["sentences"][0]["raw"]
        # on test_anti the marker never matches, so the shape negative is the marker's shape
        assert any(item["cue_shape"] in c and c != item["candidates"][item["answer"]] for c in item["candidates"])


def test_compositional_pairs_swap_colour_bindings(world):
    pairs = json.loads(world.compositional.read_text())
    assert len(pairs) == TINY.compositional
    for pair in pairs:
        a, b = (np.asarray(Image.open(world.root / p)) for p in pair["images"])
        assert (a != b).any()
        words_a, words_b = (c.split() for c in pair["captions"])
        differing = [(x, y) for x, y in zip(words_a, words_b, strict=True) if x != y]
        assert len(differing) == 2 and differing[0] == differing[1][::-1]


@pytest.mark.parametrize("attribute", ["cue", "colour"])
def test_counterfactual_groups_differ_only_in_their_attribute(world, attribute):
    data = json.loads(world.counterfactual[attribute].read_text())
    assert data["queries"] and not any(m in q for q in data["queries"] for m in MARKER_COLOURS)
    groups: dict[str, list] = {}
    for image in data["images"]:
        groups.setdefault(image["group"], []).append(image)
    assert len(groups) == TINY.counterfactual
    for members in groups.values():
        assert len({m["value"] for m in members}) == 6
        pixels = [np.asarray(Image.open(world.root / m["image"])).astype(int) for m in members]
        changed = np.any([(p != pixels[0]).any(-1) for p in pixels[1:]], axis=0)
        outside_marker = changed.copy()
        outside_marker[:MARKER_SIZE, :MARKER_SIZE] = False
        if attribute == "cue":
            assert changed[:MARKER_SIZE, :MARKER_SIZE].all() and not outside_marker.any()
        else:
            assert outside_marker.any() and not changed[:MARKER_SIZE, :MARKER_SIZE].all()


def test_missing_world_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="clipheads world make"):
        read_split(tmp_path, "train")
    with pytest.raises(DataError, match="unknown world split"):
        list(generate_split("nope", 1))
    with pytest.raises(DataError, match="world sizes cannot be negative: val_ood=-1"):
        WorldSizes(val_ood=-1)


def test_training_pixels_match_the_backend_preprocessing():
    from clipheads.world.train import build_world_clip, normalize_pixels

    backend = build_world_clip("tiny")
    images = [render_scene(s) for s, _ in generate_split("test_iid", 3, seed=0)]
    ours = normalize_pixels(torch.from_numpy(np.stack([np.asarray(im) for im in images])), backend)
    theirs = torch.stack([backend.preprocess(im) for im in images])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_world_written_over_a_larger_one_replaces_it(tmp_path):
    make_world(tmp_path / "w", seed=3, sizes=TINY, progress=False)
    smaller = WorldSizes(train=0, val_ood=4, test_ood=4, test_iid=4, test_anti=4, compositional=0, counterfactual=0)
    paths = make_world(tmp_path / "w", seed=3, sizes=smaller, progress=False)
    folder_images = [p for p in paths.classification["val_ood"].rglob("*.png")]
    assert len(folder_images) == 4  # no stale images of the larger world in the ImageFolder classes
    assert not (tmp_path / "w" / "images" / "train").exists()
    assert not (tmp_path / "w" / "compositional.json").exists()  # the smaller world has no compositional pairs
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds files that are not a clipheads world \\(notes.txt\\)"):
        make_world(tmp_path / "mine", seed=3, sizes=smaller, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


TINY_CLI = ("--n-train", "0", "--n-val", "2", "--n-test", "2", "--n-pairs", "0", "--n-groups", "0")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_issue_example_a_users_folder_survives_world_make(tmp_path, run_main, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj" / "images" / "holiday").mkdir(parents=True)
    (tmp_path / "proj" / "images" / "holiday" / "README.txt").write_text("notes\n")
    code, _, err = run_main("world", "make", "--out", "proj", *TINY_CLI)
    assert code == 2
    line = _one_error_line(err)
    assert "holds images but no world.json listing" in line and "new or empty folder" in line
    assert (tmp_path / "proj" / "images" / "holiday" / "README.txt").read_text() == "notes\n"
    assert sorted(p.name for p in (tmp_path / "proj").rglob("*")) == ["README.txt", "holiday", "images"]


def _files_on_disk(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_world_lists_every_file_and_folder_it_wrote(world):
    listing = json.loads((world.root / "world.json").read_text())
    assert listing["format"] == "clipheads.world/2" and listing["complete"] is True
    assert set(listing["files"]) | {"world.json"} == _files_on_disk(world.root)
    assert set(listing["folders"]) == {p.relative_to(world.root).as_posix() for p in world.root.rglob("*")
                                       if p.is_dir()}


def test_a_world_remade_in_its_own_folder_replaces_only_its_own_files(tmp_path, run_main):
    out = tmp_path / "w"
    assert run_main("world", "make", "--out", out, "--n-train", "3", "--n-val", "4", "--n-test", "3",
                    "--n-pairs", "1", "--n-groups", "1")[0] == 0
    code, _, err = run_main("world", "make", "--out", out, "--seed", "1", *TINY_CLI)
    assert code == 0, err
    listing = json.loads((out / "world.json").read_text())
    assert listing["seed"] == 1 and listing["complete"]
    assert _files_on_disk(out) == set(listing["files"]) | {"world.json"}  # nothing stale of the larger world
    assert not (out / "images" / "train").exists()
    # anything the world did not write, even deep inside its own folders, stops the next one (and survives)
    (out / "images" / "val_ood" / "mine.png").write_bytes(b"user's")
    code, _, err = run_main("world", "make", "--out", out, *TINY_CLI, forbid_load=True)
    assert code == 2 and "images/val_ood/mine.png" in _one_error_line(err)
    assert (out / "images" / "val_ood" / "mine.png").read_bytes() == b"user's"
    assert json.loads((out / "world.json").read_text())["seed"] == 1  # the world itself is untouched too


def test_an_interrupted_world_is_replaced_and_an_unlisted_one_refused(tmp_path):
    small = WorldSizes(train=0, val_ood=2, test_ood=2, test_iid=2, test_anti=2, compositional=0, counterfactual=0)
    root = make_world(tmp_path / "w", seed=3, sizes=small, progress=False).root
    listing = json.loads((root / "world.json").read_text())
    # as after kill -9: world.json is the planned listing, some files are missing, a temporary file is left
    (root / "world.json").write_text(json.dumps({"format": listing["format"], "complete": False,
                                                 "files": listing["files"], "folders": listing["folders"]}))
    (root / "retrieval.json").unlink()
    (root / ".retrieval.json.abc123.tmp").write_text("{")
    make_world(root, seed=3, sizes=small, progress=False)
    assert _files_on_disk(root) == set(listing["files"]) | {"world.json"}
    # a world written by an earlier clipheads (world.json without a file list) is refused, nothing deleted
    old = {k: v for k, v in json.loads((root / "world.json").read_text()).items()
           if k not in ("format", "files", "folders", "complete")}
    (root / "world.json").write_text(json.dumps(old))
    before = _digests(root)
    with pytest.raises(DataError, match="earlier clipheads.*new or empty folder"):
        make_world(root, seed=3, sizes=small, progress=False)
    assert _digests(root) == before
    (root / "world.json").unlink()
    with pytest.raises(DataError, match="no world.json listing"):
        make_world(root, seed=3, sizes=small, progress=False)

