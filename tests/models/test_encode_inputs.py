"""``encode_image`` takes images as users hold them (PIL, lists of PIL, raw uint8 tensors, preprocessed pixels) and
says in one line what it expects otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipheads.errors import ClipHeadsError


def _pil(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (37, 41, 3), dtype=np.uint8))


def test_every_image_form_gives_the_same_features(tiny_backend):
    images = [_pil(0), _pil(1)]
    pixels = torch.stack([tiny_backend.preprocess(im) for im in images])
    raw = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])  # uint8 [2, 3, H, W]
    with torch.inference_mode():
        reference = tiny_backend.encode_image(pixels)
        first, second = tiny_backend.encode_image(pixels[:1]), tiny_backend.encode_image(pixels[1:])  # batches of 1
        assert torch.equal(tiny_backend.encode_image(images), reference)
        assert torch.equal(tiny_backend.encode_image(tuple(images)), reference)
        assert torch.equal(tiny_backend.encode_image(images[0]), first)
        assert torch.equal(tiny_backend.encode_image(raw), reference)
        assert torch.equal(tiny_backend.encode_image(raw[1]), second)  # one [3, H, W] image
        assert torch.equal(tiny_backend.encode_image(pixels[0]), first)  # one preprocessed image
    assert reference.shape == (2, tiny_backend.model.visual_projection.out_features if tiny_backend.kind == "hf"
                               else tiny_backend.model.visual.output_dim)


@pytest.mark.parametrize("bad", [[], ["cat.jpg"], "cat.jpg", np.zeros((1, 3, 32, 32)), torch.zeros(2, 32, 32, 3),
                                 torch.zeros(2, 3, 32, 32, dtype=torch.int64), [Image.new("RGB", (8, 8)), 3]])
def test_anything_else_is_one_line_saying_what_is_expected(tiny_hf, bad):
    with pytest.raises(ClipHeadsError, match="expected a PIL image, a list of PIL images") as failed:
        tiny_hf.encode_image(bad)
    assert "\n" not in str(failed.value)


def test_preprocessed_pixels_of_another_size_are_one_line(tiny_backend):
    """Float pixels not resized by ``model.preprocess`` ended in the library's ValueError (HF: 'Input image size
    (65*65) doesn't match model') or a shape error deep in open_clip's embeddings."""
    size = tiny_backend.image_size
    with pytest.raises(ClipHeadsError, match=rf"pixels of {size + 1}x{size + 1}; .* takes {size}x{size}"):
        tiny_backend.encode_image(torch.rand(2, 3, size + 1, size + 1))


def test_encode_text_takes_one_string_as_one_text(tiny_backend):
    """``encode_text("a cat")`` encoded five one-letter texts ([5, D]) without a word."""
    with torch.inference_mode():
        one = tiny_backend.encode_text("a red circle")
        assert one.shape[0] == 1
        assert torch.equal(one, tiny_backend.encode_text(["a red circle"]))
    with pytest.raises(ClipHeadsError, match="no texts"):
        tiny_backend.encode_text([])  # was an IndexError inside the tokenizer
