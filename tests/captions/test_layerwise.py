"""Layer-wise cancellation with generated captions: the decoder reads the cancelled encoder, scores come from the
unmodified model, results are deterministic, and ``clipheads layers --generate`` writes and prints them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import clipheads
from clipheads.captions import (
    caption_vocabulary,
    clip_scores,
    random_vision_encoder_decoder,
)
from clipheads.captions.layerwise import LayerwiseCaptionConfig, LayerwiseCaptioning
from clipheads.cli import app
from clipheads.errors import ClipHeadsError
from clipheads.heads import layer_group_label
from clipheads.models.random_init import save_hf, tiny_model, word_tokenizer


def test_group_labels():
    assert [layer_group_label(g) for g in ([], [3], [2, 0, 1], [0, 5])] == ["none", "3", "0-2", "0,5"]


def test_generated_captions_are_deterministic(captioner, clip, images):
    for beams in (1, 2):
        config = LayerwiseCaptionConfig(num_beams=beams, prefix_from_selection=False)
        first = LayerwiseCaptioning(captioner, clip, images, config)([[], [0], [1]])
        again = LayerwiseCaptioning(captioner, clip, images, config)([[], [0], [1]])
        assert [r.generated for r in first] == [r.generated for r in again]
        assert [r.generated_clip_score for r in first] == [r.generated_clip_score for r in again]
    assert [r.layers for r in first] == ["none", "0", "1"]
    assert clip.intervention is None  # every cancellation was removed


def test_cancelled_layer_changes_the_decoder_input(captioner, clip, images):
    seen: list[torch.Tensor] = []
    handle = captioner.prefix_mlp.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    try:
        rows = LayerwiseCaptioning(captioner, clip, images, LayerwiseCaptionConfig(prefix_from_selection=False))(
            [[], [0]])
    finally:
        handle.remove()
    assert len(seen) == 2  # one decoder input per group (all images in one batch)
    with torch.no_grad():
        vanilla = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
        with clipheads.ablate(clip, clipheads.HeadMask.from_layers([0], clip), op="identity"):
            cancelled = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
    assert torch.allclose(seen[0], vanilla, atol=1e-6)
    assert torch.allclose(seen[1], cancelled, atol=1e-6)
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)
    assert rows[0].encoder_cosine == pytest.approx(1.0, abs=1e-5) and rows[1].encoder_cosine < 0.999


def test_scores_come_from_the_unmodified_model(captioner, clip, images, captions):
    selected = [captions, captions[::-1]]
    rows = LayerwiseCaptioning(captioner, clip, images, LayerwiseCaptionConfig(n_images=4))([[], [0, 1]], selected)
    with torch.no_grad():
        vanilla = clip.encode_image(images[:4])
    for row, chosen in zip(rows, selected, strict=True):
        assert row.selected == chosen[:4] and len(row.generated) == 4
        assert all(g.startswith(s) for g, s in zip(row.generated, row.selected, strict=True))  # prefix kept
        assert row.generated_clip_score == pytest.approx(clip_scores(clip, vanilla, row.generated).tolist())
        assert row.selected_clip_score == pytest.approx(clip_scores(clip, vanilla, row.selected).tolist())
    data = rows[1].to_dict()
    assert data["layers"] == "0-1" and len(data["images"]) == 4
    assert set(data["images"][0]) == {"selected", "selected_clip_score", "prefix", "generated",
                                      "generated_clip_score"}
    assert data["mean_generated_clip_score"] == pytest.approx(sum(rows[1].generated_clip_score) / 4)


def test_prefix_words_cut_the_selected_caption(captioner, clip, images, captions):
    config = LayerwiseCaptionConfig(prefix_words=2, max_new_tokens=5)
    (row,) = LayerwiseCaptioning(captioner, clip, images, config)([[1]], [captions])
    assert row.prefixes == [" ".join(c.split()[:2]) for c in captions]
    assert all(g.startswith(p) for g, p in zip(row.generated, row.prefixes, strict=True))
    assert row.to_dict()["images"][0]["prefix"] == "a red"


def test_refuses_bad_input(captioner, clip, images):
    with pytest.raises(ClipHeadsError, match="selected captions"):
        LayerwiseCaptioning(captioner, clip, images)([[0]])
    with pytest.raises(ClipHeadsError, match="not mean"):
        LayerwiseCaptioning(captioner, clip, images, LayerwiseCaptionConfig(op="mean"))
    with clipheads.ablate(clip, clipheads.HeadMask.from_layers([1], clip)), \
            pytest.raises(ClipHeadsError, match="layer-wise captioning needs the unablated"):
        LayerwiseCaptioning(captioner, clip, images, LayerwiseCaptionConfig(prefix_from_selection=False))([[0]])


def test_encoder_decoder_reads_its_own_cancelled_encoder(clip, images, captions):
    tokenizer = word_tokenizer(caption_vocabulary(captions))
    captioner = random_vision_encoder_decoder(tokenizer, n_layers=2, seed=0)
    seen: list[torch.Tensor] = []

    def record(_, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = captioner.model.decoder.register_forward_pre_hook(record, with_kwargs=True)
    config = LayerwiseCaptionConfig(prefix_from_selection=False, max_new_tokens=3)
    try:
        rows = LayerwiseCaptioning(captioner, clip, images, config)([[], [1]])
    finally:
        handle.remove()
    assert len(seen) >= 2 and captioner.backend.intervention is None
    first_step = [s for s in seen if s.shape[0] == len(images)]
    assert not torch.allclose(first_step[0], first_step[-1], atol=1e-4)  # group "1" fed other encoder states
    assert rows[1].encoder_cosine < 0.999
    assert rows == LayerwiseCaptioning(captioner, clip, images, config)([[], [1]])


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("layerwise_world")
    save_hf(tiny_model("hf", seed=0), root / "clip")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "black": (10, 10, 10)}
    images, selection = [], []
    for i, (name, colour) in enumerate(colours.items()):
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{name}.png")
        images.append({"filename": f"{name}.png", "split": "train", "imgid": i,
                       "sentences": [{"raw": f"a {name} square on the left"}]})
        selection.append({"image": f"{name}.png", "candidates": [f"a {c} square" for c in colours], "answer": i})
    (root / "karpathy.json").write_text(json.dumps({"dataset": "tiny", "images": images}))
    (root / "selection.json").write_text(json.dumps(selection))
    return root


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def test_layers_generate_cli(world, tmp_path):
    result = invoke("captioner", "train", "--data", world / "karpathy.json", "--model", world / "clip", "--out",
                    tmp_path / "cap", "--epochs", 3, "--batch-size", 4, "--prefix-length", 2, "--width", 32,
                    "--layers", 1)
    assert result.exit_code == 0, result.output
    common = ["layers", "--model", world / "clip", "--data", world / "selection.json", "--task", "selection",
              "--ranges", "0,1,0-1"]
    result = invoke(*common, "--generate", "--captioner", tmp_path / "cap", "--max-new-tokens", 4, "--beams", 2,
                    "--generate-limit", 3, "--examples", 1, "--out", tmp_path / "layers")
    assert result.exit_code == 0, result.output
    assert "UNMODIFIED" in result.output and "generated caption" in result.output
    layers = json.loads((tmp_path / "layers" / "layers.json").read_text())
    assert layers["generation_config"]["clip_score_model"] == "unmodified"
    assert layers["generation_config"]["n_images"] == 3 and layers["generation_config"]["num_beams"] == 2
    assert layers["baseline_generation"]["layers"] == "none"
    assert [g["layers"] for g in layers["groups"]] == ["0", "1", "0-1"]
    for group in layers["groups"]:
        generation = group["generation"]
        assert generation["layers"] == group["layers"] and len(generation["images"]) == 3
        assert [i["selected"] for i in generation["images"]] == group["details"]["selected"][:3]
        for image in generation["images"]:
            assert image["generated"].startswith(image["selected"])
            assert 0 <= image["generated_clip_score"] <= 100 and 0 <= image["selected_clip_score"] <= 100
    assert invoke(*common, "--out", tmp_path / "plain").exit_code == 0
    assert "generation" not in json.loads((tmp_path / "plain" / "layers.json").read_text())["groups"][0]

    missing = invoke(*common, "--generate", "--out", tmp_path / "missing")
    assert missing.exit_code != 0 and "--captioner" in missing.output


def test_layers_generate_cli_with_an_encoder_decoder(world, tmp_path):
    words = caption_vocabulary([f"a {c} square on the left" for c in ("red", "blue", "green", "black")])
    random_vision_encoder_decoder(word_tokenizer(words), n_layers=2, seed=0).save(tmp_path / "ved")
    result = invoke("layers", "--model", world / "clip", "--data", world / "selection.json", "--ranges", "1",
                    "--generate", "--captioner", tmp_path / "ved", "--max-new-tokens", 3, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "out" / "layers.json").read_text())
    assert layers["generation_config"]["captioner_encoder"].startswith("own")
    generation = layers["groups"][0]["generation"]
    assert len(generation["images"]) == 4 and generation["encoder_cosine"] < 0.999
