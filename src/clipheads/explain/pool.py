"""The text pool TextSpan chooses descriptions from: a default pool generated from word lists, or a user file.

The default pool is built from the word lists below by fixed templates, in a fixed order, and capped per template
with a seeded sample: the same version of clipheads always produces the same pool. Every text carries the concepts
it is about (its *tags*, e.g. ``{"colour", "shape"}`` for "a red circle"), which the offline judge uses to build
and calibrate its concept prototypes. The word lists also cover the bundled world (its shapes, colours, sizes and
grid positions), so that heads of the bundled model can be described in words its text tower knows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from clipheads.errors import DataError

logger = logging.getLogger(__name__)

# concept -> words or short phrases (the concept vocabulary of the offline judge)
CONCEPT_WORDS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey",
               "cyan", "magenta", "turquoise", "beige", "navy blue", "golden", "silver"),
    "shape": ("circle", "square", "triangle", "diamond", "cross", "star", "rectangle", "oval", "hexagon", "heart",
              "spiral", "arrow", "crescent", "ring", "cube", "sphere", "cone", "pyramid"),
    "size": ("small", "large", "tiny", "huge", "big", "little", "giant", "miniature"),
    "position": ("at the top left", "at the top", "at the top right", "on the left", "in the middle",
                 "on the right", "at the bottom left", "at the bottom", "at the bottom right"),
    "count": ("two", "three", "four", "five", "six", "many", "several", "a pair of", "a group of",
              "a crowd of", "dozens of"),
    "animal": ("dog", "cat", "horse", "bird", "fish", "cow", "sheep", "elephant", "lion", "tiger", "bear", "zebra",
               "giraffe", "monkey", "rabbit", "deer", "fox", "wolf", "owl", "eagle", "duck", "frog", "snake",
               "turtle", "butterfly", "bee", "whale", "dolphin", "penguin", "parrot", "camel", "squirrel"),
    "person": ("man", "woman", "child", "baby", "boy", "girl", "old man", "old woman", "teenager", "doctor", "chef",
               "soldier", "athlete", "student", "farmer", "dancer", "musician", "nurse", "firefighter", "bride",
               "police officer", "businessman", "surfer", "skier"),
    "object": ("chair", "table", "lamp", "cup", "bottle", "book", "phone", "laptop", "clock", "umbrella", "bag",
               "shoe", "hat", "guitar", "ball", "vase", "key", "pillow", "mirror", "candle", "basket", "kettle",
               "camera", "backpack", "scissors", "teapot"),
    "vehicle": ("car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "boat", "ship", "tractor",
                "helicopter", "scooter", "taxi", "van", "tram", "sailboat"),
    "food": ("apple", "banana", "pizza", "cake", "bread", "sandwich", "soup", "salad", "coffee", "sushi", "burger",
             "strawberry", "cheese", "rice", "noodles", "donut", "ice cream", "pasta", "grapes", "cookies"),
    "plant": ("tree", "flower", "rose", "sunflower", "cactus", "grass", "fern", "palm tree", "mushroom", "tulip",
              "bush", "pine tree", "moss", "bamboo", "ivy"),
    "scene": ("beach", "forest", "mountain", "desert", "city street", "kitchen", "bedroom", "office", "park",
              "river", "lake", "field", "garden", "bridge", "market", "stadium", "library", "classroom", "highway",
              "harbor", "waterfall", "cave", "farm", "airport", "living room", "subway station", "snowy valley"),
    "location": ("Paris", "Tokyo", "New York", "India", "Egypt", "Brazil", "China", "Italy", "Mexico", "Kenya",
                 "Norway", "Australia", "Japan", "Morocco", "Greece", "Peru", "London", "Iceland", "Thailand",
                 "Canada"),
    "texture": ("smooth", "rough", "furry", "fluffy", "shiny", "glossy", "matte", "wrinkled", "bumpy", "grainy",
                "woven", "knitted", "scaly", "cracked", "rusty", "fuzzy", "silky", "feathery"),
    "material": ("wood", "metal", "glass", "plastic", "stone", "brick", "concrete", "leather", "fabric", "paper",
                 "marble", "ceramic", "wool", "steel", "clay", "rubber"),
    "pattern": ("striped", "dotted", "checkered", "plaid", "floral", "zigzag", "spotted", "gradient", "blotchy",
                "camouflage", "polka dot", "wavy", "geometric", "paisley"),
    "style": ("a painting", "a sketch", "a cartoon", "a watercolor", "an oil painting", "a photograph",
              "a 3D render", "pixel art", "a pencil drawing", "an anime drawing", "a mosaic", "a comic",
              "a vintage photo", "a black and white photo", "a blurry photo", "a close-up photo", "an aerial photo",
              "a long exposure photo", "a low resolution photo", "an illustration"),
    "weather": ("sunny", "rainy", "snowy", "foggy", "cloudy", "stormy", "at night", "at sunset", "at dawn",
                "in winter", "in summer", "in autumn", "under a rainbow", "in the mist"),
    "emotion": ("happy", "sad", "angry", "smiling", "laughing", "crying", "surprised", "calm", "scared", "bored",
                "excited", "tired"),
    "activity": ("running", "swimming", "eating", "sleeping", "reading", "playing", "dancing", "cooking",
                 "driving", "jumping", "climbing", "singing", "painting", "writing", "walking", "fishing"),
    "text": ("letters", "numbers", "a sign with text", "a logo", "handwriting", "a barcode", "a map", "a chart",
             "a newspaper page", "a label", "a poster with words", "a license plate"),
}

# the bundled world's words (kept here so that this module does not depend on the world package)
WORLD_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
WORLD_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
WORLD_SIZES = ("small", "large")
WORLD_POSITIONS = CONCEPT_WORDS["position"]


@dataclass(frozen=True)
class TextPool:
    """Texts and, for generated pools, the concepts each text is about (empty sets for user texts)."""

    texts: list[str]
    tags: list[frozenset[str]]
    source: str = "default"

    def __len__(self) -> int:
        return len(self.texts)

    def single_concept(self, concept: str) -> list[int]:
        """Indices of the texts about ``concept`` alone."""
        return [i for i, tags in enumerate(self.tags) if tags == {concept}]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _a(word: str) -> str:
    return f"{_article(word)} {word}"


_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "fish": "fish", "sheep": "sheep", "deer": "deer",
              "police officer": "police officers", "businessman": "businessmen", "mouse": "mice"}


def _plural(phrase: str) -> str:
    *head, last = phrase.split(" ")
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


# (template, concepts it fills, cap); a template's slots are filled with the words of its concepts in order
_W = CONCEPT_WORDS
_SINGLE: list[tuple[str, list[str]]] = [
    ("{colour}", ["colour"]), ("the colour {colour}", ["colour"]), ("something {colour}", ["colour"]),
    ("{a_shape}", ["shape"]), ("{a_shape} shape", ["shape"]), ("a drawing of {a_shape}", ["shape"]),
    ("{size}", ["size"]), ("something {size}", ["size"]), ("{a_size} object", ["size"]),
    ("{position}", ["position"]), ("something {position}", ["position"]), ("an object {position}", ["position"]),
    ("{count} things", ["count"]), ("{count} objects", ["count"]),
    ("a photo of {a_animal}", ["animal"]), ("{a_animal}", ["animal"]), ("a picture of {a_animal}", ["animal"]),
    ("a photo of {a_person}", ["person"]), ("{a_person}", ["person"]), ("a portrait of {a_person}", ["person"]),
    ("a photo of {a_object}", ["object"]), ("{a_object}", ["object"]),
    ("a photo of {a_vehicle}", ["vehicle"]), ("{a_vehicle}", ["vehicle"]),
    ("a photo of {food}", ["food"]), ("a plate of {food}", ["food"]),
    ("a photo of {a_plant}", ["plant"]), ("{a_plant}", ["plant"]),
    ("a photo of {a_scene}", ["scene"]), ("a view of {a_scene}", ["scene"]),
    ("a photo taken in {location}", ["location"]), ("a street in {location}", ["location"]),
    ("a {texture} surface", ["texture"]), ("something {texture}", ["texture"]),
    ("made of {material}", ["material"]), ("a {material} surface", ["material"]),
    ("a {pattern} pattern", ["pattern"]), ("something {pattern}", ["pattern"]),
    ("{style}", ["style"]), ("{style} of something", ["style"]),
    ("a photo taken {weather}", ["weather"]), ("a landscape {weather}", ["weather"]),
    ("a {emotion} face", ["emotion"]), ("someone {emotion}", ["emotion"]),
    ("someone {activity}", ["activity"]), ("a photo of people {activity}", ["activity"]),
    ("{text}", ["text"]), ("an image with {text}", ["text"]),
]
_PAIRS: list[tuple[str, list[str], int]] = [
    ("{a_colour} {object}", ["colour", "object"], 160), ("{a_colour} {vehicle}", ["colour", "vehicle"], 100),
    ("{a_colour} {animal}", ["colour", "animal"], 80), ("{a_size} {animal}", ["size", "animal"], 80),
    ("{count} {p_animal}", ["count", "animal"], 100), ("{count} {p_person}", ["count", "person"], 60),
    ("{a_animal} in {a_scene}", ["animal", "scene"], 150), ("{a_person} in {a_scene}", ["person", "scene"], 150),
    ("{a_person} {activity}", ["person", "activity"], 120), ("{a_emotion} {person}", ["emotion", "person"], 100),
    ("{a_object} made of {material}", ["object", "material"], 120),
    ("{a_pattern} {object}", ["pattern", "object"], 100), ("{a_texture} {animal}", ["texture", "animal"], 60),
    ("{style} of {a_animal}", ["style", "animal"], 120), ("{style} of {a_scene}", ["style", "scene"], 120),
    ("{a_scene} {weather}", ["scene", "weather"], 120), ("{a_scene} in {location}", ["scene", "location"], 120),
    ("{a_vehicle} in {a_scene}", ["vehicle", "scene"], 100), ("{food} on {a_object}", ["food", "object"], 60),
    ("{a_plant} in {a_scene}", ["plant", "scene"], 80), ("{a_colour} {plant}", ["colour", "plant"], 60),
    ("{a_colour} {shape}", ["colour", "shape"], 200), ("{a_size} {shape}", ["size", "shape"], 100),
    ("{a_shape} {position}", ["shape", "position"], 200), ("{count} {p_shape}", ["count", "shape"], 80),
    ("{a_pattern} {shape}", ["pattern", "shape"], 60),
]
# the bundled world: every size-colour-shape-position description, and the shorter forms its captions use
_WORLD: list[tuple[str, list[str], int]] = [
    ("a {wsize} {wcolour} {wshape} {wposition}", ["size", "colour", "shape", "position"], 648),
    ("a {wcolour} {wshape} {wposition}", ["colour", "shape", "position"], 324),
    ("a {wsize} {wshape} {wposition}", ["size", "shape", "position"], 108),
    ("a {wsize} {wcolour} {wshape}", ["size", "colour", "shape"], 72),
]


def _fill(template: str, slots: dict[str, tuple[str, ...]]) -> list[str]:
    names = [name for name in slots if any("{" + p + name + "}" in template for p in ("", "a_", "p_"))]
    out = []
    for values in product(*(slots[name] for name in names)):
        fields = {}
        for name, value in zip(names, values, strict=True):
            fields[name] = value
            fields["a_" + name] = _a(value)
            fields["p_" + name] = _plural(value)
        out.append(template.format(**fields))
    return out


def default_pool(seed: int = 0) -> TextPool:
    """The default pool: about 4,000 short generic image descriptions with their concept tags.

    Single-concept templates use every word; two-concept and world templates are capped by a sample drawn with
    ``seed`` (fixed per template), so the pool is reproducible.
    """
    slots = dict(CONCEPT_WORDS)
    slots.update(wshape=WORLD_SHAPES, wcolour=WORLD_COLOURS, wsize=WORLD_SIZES, wposition=WORLD_POSITIONS)
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    tags: list[frozenset[str]] = []
    seen: set[str] = set()
    templates = [(t, c, 0) for t, c in _SINGLE] + _PAIRS + _WORLD
    for template, concepts, cap in templates:
        filled = _fill(template, slots)
        if cap and len(filled) > cap:
            filled = [filled[i] for i in sorted(rng.choice(len(filled), cap, replace=False).tolist())]
        for text in filled:
            if text not in seen:
                seen.add(text)
                texts.append(text)
                tags.append(frozenset(concepts))
    return TextPool(texts, tags, source="default")


def load_texts(path: str | os.PathLike) -> TextPool:
    """A user text pool: one text per line (UTF-8); blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"text file {str(path)!r} is not UTF-8 text") from None
    texts = list(dict.fromkeys(s for s in (line.strip() for line in lines) if s and not s.startswith("#")))
    if len(texts) < 2:
        raise DataError(f"text file {str(path)!r} has {len(texts)} texts; TextSpan needs at least 2 (one per line)")
    return TextPool(texts, [frozenset()] * len(texts), source=str(path))


def known_texts(model, pool: TextPool, batch_size: int = 1024) -> TextPool:
    """The texts of ``pool`` that ``model``'s tokenizer can spell without its unknown token.

    A word-level tokenizer (the bundled model's) maps every word outside its vocabulary to one unknown token, whose
    feature means nothing; such texts are dropped. Byte-level BPE tokenizers know every text (and CLIP's uses its
    end-of-text token as "unknown"), so for them the pool is returned as it is.
    """
    tokenizer = getattr(model, "tokenizer", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    special = {getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if unk is None or unk in special:
        return pool
    keep = []
    for start in range(0, len(pool), batch_size):
        ids = model.tokenize(pool.texts[start:start + batch_size])["input_ids"]
        keep += [start + i for i in (~(ids == unk).any(dim=1)).nonzero().flatten().tolist()]
    if len(keep) < 2:
        raise DataError(f"{model.name}: its tokenizer knows fewer than 2 of the {len(pool)} texts of {pool.source}")
    if len(keep) < len(pool):
        logger.info("%s: kept %d of %d texts (the others contain words its tokenizer does not know)", model.name,
                    len(keep), len(pool))
    return TextPool([pool.texts[i] for i in keep], [pool.tags[i] for i in keep], pool.source)


def get_pool(texts: str | os.PathLike | None = None, seed: int = 0) -> TextPool:
    """``None`` or ``"default"``: the default pool; otherwise a text file."""
    return default_pool(seed) if texts is None or str(texts) == "default" else load_texts(texts)
