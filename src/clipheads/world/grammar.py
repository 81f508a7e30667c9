"""The caption grammar of the bundled world and the word-level tokenizer built from its vocabulary.

Captions describe objects by size, colour, shape and position or relation, e.g.
``"a small red circle at the top left and a large blue star on the right"`` or
``"a large blue star right of a small red circle"``. They never mention the background or the corner marker.
"""

from __future__ import annotations

import numpy as np

from clipheads.world.scene import COLOURS, POSITIONS, SHAPES, SIZES, Scene, WorldObject

RELATION_WORDS = ("left", "right", "of", "above", "below")
FILLER_WORDS = ("a", "and", "at", "the", "on", "in", "top", "bottom", "middle")


def vocabulary() -> list[str]:
    """Every word a caption of the grammar can use, in a fixed order (the tokenizer's ids follow it)."""
    words: list[str] = []
    for group in (FILLER_WORDS, RELATION_WORDS, tuple(SIZES), tuple(COLOURS), SHAPES,
                  tuple(w for phrase in POSITIONS.values() for w in phrase.split())):
        for word in group:
            if word not in words:
                words.append(word)
    return words


def world_tokenizer(model_max_length: int = 32):
    """A word-level Hugging Face tokenizer over :func:`vocabulary` (saves with ``save_pretrained``)."""
    from clipheads.models.random_init import word_tokenizer

    return word_tokenizer(vocabulary(), model_max_length=model_max_length)


def object_phrase(obj: WorldObject, size: bool = True, colour: bool = True) -> str:
    # "a orange circle" (no size) stays ungrammatical on purpose: the bundled model's word-level tokenizer has no
    # "an" (it would read <unk>), and it was trained on these captions; see the README ("Small things").
    words = ["a"] + ([obj.size] if size else []) + ([obj.colour] if colour else []) + [obj.shape]
    return " ".join(words)


def positional_caption(scene: Scene) -> str:
    """The full caption: every object with size, colour, shape and grid position, in reading order."""
    return " and ".join(f"{object_phrase(o)} {o.position}" for o in scene.objects)


def relation(a: WorldObject, b: WorldObject) -> str:
    """Where ``a`` is relative to ``b``: ``left of``, ``right of``, ``above`` or ``below`` (rows win ties)."""
    if a.cell[0] != b.cell[0]:
        return "above" if a.cell[0] < b.cell[0] else "below"
    return "left of" if a.cell[1] < b.cell[1] else "right of"


def relational_caption(scene: Scene, flip: bool = False) -> str:
    """``"a small red circle left of a large blue star"`` (two objects; ``flip`` names the second object first)."""
    a, b = scene.objects[:2]
    if flip:
        a, b = b, a
    return f"{object_phrase(a)} {relation(a, b)} {object_phrase(b)}"


def short_caption(scene: Scene, kind: int) -> str:
    """A less specific caption of a one-object scene: 0 no colour, 1 no size, 2 no position."""
    obj = scene.first
    if kind == 0:
        return f"{object_phrase(obj, colour=False)} {obj.position}"
    if kind == 1:
        return f"{object_phrase(obj, size=False)} {obj.position}"
    return object_phrase(obj)


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Two captions per scene: the full positional one, then a relational (2 objects) or short (1 object) one."""
    second = (relational_caption(scene, flip=bool(rng.random() < 0.5)) if len(scene.objects) > 1
              else short_caption(scene, int(rng.integers(3))))
    return [positional_caption(scene), second]


def shape_swapped_caption(scene: Scene, shape: str) -> str:
    """The full caption with the first object's shape replaced by ``shape`` (to read what the model thinks it is)."""
    objects = (scene.first.replace(shape=shape), *scene.objects[1:])
    return positional_caption(scene.with_objects(objects))


NEUTRAL_QUERIES = tuple(f"a {size} {shape}" for shape in SHAPES for size in SIZES)
