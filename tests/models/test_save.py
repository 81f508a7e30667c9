"""``clipheads.save``: a baked model saved and loaded back encodes images and texts exactly as before, on every
backend, with its tokenizer, image processor and (open_clip) model and preprocessing config."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import clipheads
from clipheads.errors import ClipHeadsError, ModelLoadError
from clipheads.metrics import retrieval_metrics
from clipheads.models.hf import HFBackend
from clipheads.models.random_init import TINY_KINDS, tiny_model
from clipheads.world import generate_split, render_scene

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220), "yellow": (230, 220, 30)}
CAPTIONS = [f"a {word} square" for word in COLOURS]


def _images() -> list[Image.Image]:
    # different sizes: the saved image processor must resize and crop exactly as the original one
    return [Image.new("RGB", (40 + 3 * i, 36), colour) for i, colour in enumerate(COLOURS.values())]


def _encode(backend, images, captions):
    with torch.inference_mode():
        return (backend.encode_image(images, normalize=True), backend.encode_text(captions, normalize=True))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_baked_model_round_trips_exactly(kind, tmp_path):
    backend = tiny_model(kind, seed=4)
    mask = clipheads.HeadMask.from_heads("L0.H1,L1.H3", backend)
    baked = clipheads.bake(backend, mask, op="scale", alpha=0.25)
    before_images, before_texts = _encode(clipheads.as_backend(baked), _images(), CAPTIONS)

    folder = clipheads.save(baked, tmp_path / "baked")
    loaded = clipheads.load(folder)
    after_images, after_texts = _encode(loaded, _images(), CAPTIONS)

    assert loaded.kind == backend.kind and type(loaded.model) is type(backend.model)
    assert torch.equal(before_images, after_images) and torch.equal(before_texts, after_texts)
    assert torch.equal(clipheads.as_backend(baked).preprocess(_images()[1]), loaded.preprocess(_images()[1]))
    captions_image = list(range(len(CAPTIONS)))
    assert (retrieval_metrics(before_images, before_texts, captions_image).metrics
            == retrieval_metrics(after_images, after_texts, captions_image).metrics)
    # the bake really is in the saved weights: the loaded model differs from the unbaked one
    assert not torch.equal(_encode(backend, _images(), CAPTIONS)[0], after_images)
    sidecar = json.loads((folder / "clipheads.json").read_text())
    assert sidecar["backend"] == backend.kind and sidecar["architecture"]["n_heads"] == 4
    assert sidecar["baked"] == [{"model": backend.name, "operator": {"name": "scale", "alpha": 0.25},
                                 "ablated": ["L0.H1", "L1.H3"]}]


def test_library_loaders_read_the_saved_folders(tmp_path):
    """The folders are the libraries' own formats, not something only clipheads reads."""
    import open_clip
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    hf = tiny_model("hf", seed=1)
    folder = clipheads.save(hf, tmp_path / "hf")
    assert torch.equal(CLIPModel.from_pretrained(folder).visual_projection.weight, hf.model.visual_projection.weight)
    assert len(AutoTokenizer.from_pretrained(folder)) == len(hf.tokenizer)
    assert AutoImageProcessor.from_pretrained(folder).crop_size["height"] == hf.image_size

    oc = tiny_model("open_clip", seed=1)
    folder = clipheads.save(oc, tmp_path / "oc")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert torch.equal(model.visual.proj, oc.model.visual.proj)
    assert torch.equal(preprocess(_images()[0]), oc.preprocess(_images()[0]))


def test_bundled_model_baked_and_reloaded_keeps_its_retrieval(tmp_path):
    """The first-hour report: baked + save_pretrained + load gave a 2-token tokenizer and mean recall 0.6667."""
    model = clipheads.load("bundled")
    scenes = list(generate_split("test_ood", 12))
    images = [render_scene(scene) for scene, _ in scenes]
    captions = [caps[0] for _, caps in scenes]
    baked = clipheads.bake(model, clipheads.HeadMask.from_heads("L1.H1,L3.H2", model), op="zero")
    before = _encode(clipheads.as_backend(baked), images, captions)
    loaded = clipheads.load(clipheads.save(baked, tmp_path / "baked"))
    after = _encode(loaded, images, captions)
    assert len(loaded.tokenizer) == len(model.tokenizer) > 2
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    index = list(range(len(images)))
    assert retrieval_metrics(*before, index).mean_recall == retrieval_metrics(*after, index).mean_recall


def test_a_folder_without_tokenizer_files_refuses_text_in_one_line(tmp_path):
    """A bare save_pretrained: transformers would build an empty tokenizer (every word <unk>); clipheads has none."""
    tiny_model("hf").model.save_pretrained(tmp_path)
    loaded = clipheads.load(tmp_path)
    assert loaded.tokenizer is None
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        loaded.encode_text(["a red square"])


def test_save_refuses_what_it_cannot_write_completely(tmp_path):
    backend = tiny_model("hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder of other files is never replaced
        with pytest.raises(ClipHeadsError, match="holds other files"):
            clipheads.save(backend, tmp_path / "full", overwrite=overwrite)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ClipHeadsError, match="is a file"):
        clipheads.save(backend, tmp_path / "file")
    with clipheads.ablate(backend, clipheads.HeadMask.from_heads("L0.H0", backend)), \
            pytest.raises(ClipHeadsError, match="bake"):
        clipheads.save(backend, tmp_path / "ablated")
    with pytest.raises(ClipHeadsError, match="no tokenizer"):
        clipheads.save(HFBackend(backend.model.__class__(backend.model.config), "bare"), tmp_path / "bare")
    assert not (tmp_path / "ablated").exists() and not (tmp_path / "bare").exists()
    # a model saved before is replaced only with overwrite
    clipheads.save(tiny_model("hf", seed=9), tmp_path / "model")
    with pytest.raises(ClipHeadsError, match="holds a saved model"):
        clipheads.save(backend, tmp_path / "model")
    clipheads.save(backend, tmp_path / "model", overwrite=True)
    with torch.inference_mode():
        assert torch.equal(clipheads.load(tmp_path / "model").encode_text(["a red square"]),
                           backend.encode_text(["a red square"]))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
