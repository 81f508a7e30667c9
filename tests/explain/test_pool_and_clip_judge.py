"""The default text pool and the offline judge over the model's own text tower."""

from __future__ import annotations

import pytest

from clipheads.errors import DataError
from clipheads.eval import encode_text_batches
from clipheads.explain.judges import ClipJudge
from clipheads.explain.pool import CONCEPT_WORDS, default_pool, known_texts, load_texts
from clipheads.models.random_init import random_hf_clip


@pytest.fixture(scope="module")
def pool():
    return default_pool()


@pytest.fixture(scope="module")
def tiny():
    return random_hf_clip("tiny")


def test_default_pool_is_reproducible_and_tagged(pool):
    assert 3000 <= len(pool) <= 6000 and len(set(pool.texts)) == len(pool)
    assert default_pool().texts == pool.texts
    assert all(tags <= set(CONCEPT_WORDS) for tags in pool.tags)
    for concept in CONCEPT_WORDS:
        assert len(pool.single_concept(concept)) >= 2, concept
    assert {"a photo of an elephant", "two foxes", "a crowd of fish", "two women"} <= set(pool.texts)


def test_default_pool_covers_the_bundled_world(pool):
    from clipheads.world.grammar import vocabulary
    from clipheads.world.scene import COLOURS, SHAPES

    texts = set(pool.texts)
    assert {"a small red circle at the top left", "a large purple star at the bottom right"} <= texts
    assert all(f"a {shape}" in texts for shape in SHAPES) and set(COLOURS) <= texts
    world_words = set(vocabulary())
    assert sum(set(t.split()) <= world_words for t in pool.texts) > 1000


def test_unknown_words_are_dropped_for_word_level_tokenizers(pool, tiny):
    known = known_texts(tiny, pool)
    assert 10 < len(known) < len(pool) and "a red square" in known.texts and "a photo of a zebra" not in known.texts
    assert known.tags[known.texts.index("a red square")] == {"colour", "shape"}


def test_user_text_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("# my pool\na red car\n\na blue sky\na red car\n")
    assert load_texts(path).texts == ["a red car", "a blue sky"]
    path.write_text("only one\n")
    with pytest.raises(DataError, match="at least 2"):
        load_texts(path)
    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")


def test_clip_judge_labels_from_its_vocabulary_and_is_calibrated(pool, tiny):
    known = known_texts(tiny, pool)
    judge = ClipJudge(tiny, pool=known, pool_features=encode_text_batches(tiny, known.texts))
    assert set(judge.concepts) == {"colour", "shape", "size", "position", "animal", "vehicle", "plant"}
    calibration = judge.calibration
    assert calibration.n_positive > 0 and calibration.n_negative > 0 and 0.5 <= calibration.balanced_accuracy <= 1
    descriptions = ["red", "blue", "a red square", "a dog", "green"]
    label = judge.label(descriptions)
    assert label in judge.concepts
    verdicts = judge.judge(label, descriptions)
    assert len(verdicts) == 5 and all(isinstance(v, bool) for v in verdicts)
    # a fixed threshold is used as given; every description passes a threshold below every score
    assert all(ClipJudge(tiny, threshold=-10.0, pool=known).judge("colour", descriptions))
