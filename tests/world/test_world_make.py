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
