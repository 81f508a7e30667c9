from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipheads.data import load_retrieval

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30), (20, 20, 20), (240, 240, 240)]
WORDS = ["red", "green", "blue", "yellow", "black", "white"]


@pytest.fixture()
def world(tmp_path: Path) -> Path:
    """Six 32 px images (one colour each) and a Karpathy JSON with two captions per image."""
    (tmp_path / "img").mkdir()
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (32, 32), colour)
        image.paste((255 - colour[0], 128, colour[2] // 2), (4 * i, 4, 4 * i + 8, 20))
        image.save(tmp_path / "img" / f"{i}.png")
    images = [{"filename": f"{i}.png", "filepath": "img", "split": "test",
               "sentences": [{"raw": f"a {word} square"}, {"raw": f"a photo of {word}"}]}
              for i, word in enumerate(WORDS)]
    (tmp_path / "retrieval.json").write_text(json.dumps({"dataset": "colours", "images": images}))
    return tmp_path


@pytest.fixture()
def retrieval_set(world: Path):
    return load_retrieval(world / "retrieval.json", split="test")


class Counter:
    """Counts the images/texts a backend's library encoders see."""

    def __init__(self, backend, monkeypatch) -> None:
        self.images = self.texts = 0
        encode_image, encode_text = backend._encode_image, backend._encode_text

        def count_images(pixels):
            self.images += len(pixels)
            return encode_image(pixels)

        def count_texts(tokens):
            self.texts += len(next(iter(tokens.values())))
            return encode_text(tokens)

        monkeypatch.setattr(backend, "_encode_image", count_images)
        monkeypatch.setattr(backend, "_encode_text", count_texts)


@pytest.fixture()
def counter(tiny_hf, monkeypatch) -> Counter:
    return Counter(tiny_hf, monkeypatch)
