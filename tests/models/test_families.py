"""The transformers families besides CLIP/Chinese-CLIP/SigLIP, on tiny random models of the real classes:
``AltCLIPModel``, ``MetaClip2Model``, ``Siglip2Model`` (fixed grid and NaFlex inputs) and a CLIP's towers used apart
(``CLIPVisionModelWithProjection`` + ``CLIPTextModelWithProjection``).

For each: the five operators against the naive explicit-attention reference, the all-ones mask bit-exact to the
library's forward, bake -> save -> load, ``clipheads info``, and the search (single-head scan, AAT-GA) running."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import clipheads
from clipheads.cli import app
from clipheads.errors import OperatorError
from clipheads.interventions import OPERATORS
from clipheads.models.random_init import HF_FAMILIES, tiny_model

_spec = importlib.util.spec_from_file_location(
    "interventions_reference", Path(__file__).parents[1] / "interventions" / "test_reference.py")
_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reference)
naive_encode = _reference.naive_encode

CLASSES = {"altclip": "AltCLIPModel", "metaclip2": "MetaClip2Model", "siglip2": "Siglip2Model",
           "towers": "CLIPTowers"}


@pytest.fixture(scope="module")
def family_models():
    return {family: tiny_model(family, seed=5) for family in HF_FAMILIES}


@pytest.fixture(scope="module", params=HF_FAMILIES)
def family(request, family_models):
    return family_models[request.param]


def library_image_features(backend, pixels: torch.Tensor) -> torch.Tensor:
    """The image embedding by the library's own forward, called here without clipheads."""
    model = backend.model
    name = type(model).__name__
    if name == "CLIPTowers":
        return model.vision(pixel_values=pixels).image_embeds
    if name == "Siglip2Model":
        return model.get_image_features(**backend.naflex_inputs(pixels)).pooler_output
    return model.get_image_features(pixel_values=pixels).pooler_output


@pytest.mark.parametrize("op", OPERATORS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_operator_matches_naive_reference(family, pixels, op, soft):
    if op == "cls" and family.prefix_tokens == 0:  # SigLIP 2: no class token, the operator is refused in one line
        mask = clipheads.HeadMask.from_heads("L0.H0", family)
        with pytest.raises(OperatorError, match="needs a class token"), clipheads.ablate(family, mask, op=op):
            family.encode_image(pixels)
        return
    _reference.test_operator_matches_naive_reference(family, pixels, op, soft)


def test_all_ones_mask_is_the_library_bit_for_bit(family, pixels):
    with torch.inference_mode():
        library = library_image_features(family, pixels)
        vanilla = family.encode_image(pixels)
        with clipheads.ablate(family, clipheads.HeadMask.ones(family), op="zero"):
            ones = family.encode_image(pixels)
        gates = torch.ones(family.n_layers, family.n_heads)
        naive = naive_encode(family, pixels, gates, "identity")
    assert torch.equal(vanilla, library) and torch.equal(ones, library)
    assert (naive - library).abs().max() <= 1e-5
    assert family.hooked_layers == []


@pytest.fixture(scope="module")
def baked_folders(family_models, tmp_path_factory):
    """Each family zero-ablated at L0.H1 and L1.H2, baked and saved: (folder, expected embedding of fixed pixels)."""
    torch.manual_seed(11)
    pixels = torch.randn(2, 3, 32, 32)
    folders = {}
    for name, backend in family_models.items():
        mask = clipheads.HeadMask.from_heads("L0.H1,L1.H2", backend)
        with torch.inference_mode(), clipheads.ablate(backend, mask, op="zero"):
            hooked = backend.encode_image(pixels)
        folder = clipheads.save(clipheads.bake(backend, mask, op="zero"), tmp_path_factory.mktemp(name) / "baked")
        folders[name] = (folder, pixels, hooked)
    return folders


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_bake_save_load_round_trip(baked_folders, family_models, name):
    folder, pixels, hooked = baked_folders[name]
    loaded = clipheads.load(str(folder))
    assert type(loaded) is type(family_models[name])
    assert json.loads((folder / "clipheads.json").read_text())["baked"][0]["ablated"] == ["L0.H1", "L1.H2"]
    with torch.inference_mode():
        assert (loaded.encode_image(pixels) - hooked).abs().max() <= 1e-5
        texts = ["a red circle", "two blue squares"]
        assert torch.equal(loaded.encode_text(texts), family_models[name].encode_text(texts))


@pytest.mark.parametrize("op, alpha", [("scale", 0.3), ("mean", None)])
def test_bake_other_foldable_operators(family, pixels, op, alpha):
    mask = clipheads.HeadMask.from_heads("L1.H0", family)
    means = torch.randn(family.n_layers, family.n_heads, family.head_dim) if op == "mean" else None
    with torch.inference_mode():
        with clipheads.ablate(family, mask, op=op, alpha=alpha, means=means):
            hooked = family.encode_image(pixels)
        baked = clipheads.load(clipheads.bake(family, mask, op=op, alpha=alpha, means=means)).encode_image(pixels)
    assert (baked - hooked).abs().max() <= 1e-5 and (hooked - family.encode_image(pixels)).abs().max() > 1e-4


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_info_names_the_class_and_heads(baked_folders, name):
    result = CliRunner().invoke(app, ["info", "--model", str(baked_folders[name][0])])
    assert result.exit_code == 0, result.output
    assert CLASSES[name] in result.output and "L0.H0 .. L1.H3" in result.output


def test_single_head_scan_equals_one_at_a_time(family):
    from clipheads.search import MaskEvaluator, Objective, scan_heads

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32, generator=generator)
    weights = torch.randn(family.encode_image(pixels[:1]).shape[-1], generator=generator)
    objective = Objective(lambda f: float((torch.tanh(f) * weights).sum()), "feature_sum")
    evaluator = MaskEvaluator(family, pixels, objective, op="zero", batch_size=8)
    assert evaluator.fast_path  # split layers (SigLIP 2: the last layer whole, its pool reads every token)
    scan = scan_heads(evaluator, max_top_k=1)
    for layer, head in [(0, 0), (1, 3)]:
        mask = clipheads.HeadMask.from_heads([(layer, head)], family)
        with torch.no_grad(), clipheads.ablate(family, mask, op="zero"):
            expected = objective(family.encode_image(pixels))
        assert scan.scores[layer, head].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert family.hooked_layers == []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Ten random 32 px images with captions in a Karpathy JSON (val: search split, test: held out)."""
    root = tmp_path_factory.mktemp("families_world")
    rng = np.random.default_rng(0)
    colours, shapes = ["red", "green", "blue", "yellow", "black"], ["circle", "square", "cat", "dog", "car"]
    images = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        caption = f"a {colours[i % 5]} {shapes[(i * 3) % 5]}"
        images.append({"filename": f"{i}.png", "split": "val" if i < 5 else "test", "imgid": i,
                       "sentences": [{"raw": caption}, {"raw": caption + " on the left"}]})
    (root / "karpathy.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    return root / "karpathy.json"


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_demo_size_search_runs(baked_folders, world, tmp_path, name):
    """The CLI's AAT-GA (with its single-head scan) on a handful of images, from the family's saved folder."""
    model = str(baked_folders[name][0])
    result = CliRunner().invoke(app, ["search", "--model", model, "--data", str(world), "--batch-size", "8",
                                      "--strategy", "ga", "--population", "4", "--generations", "2",
                                      "--out", str(tmp_path / "ga")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ga" / "summary.json").read_text())
    assert summary["strategy"] == "ga" and summary["evaluations"] >= 2 and summary["search"]["split"].endswith(":val")
    assert summary["heldout"]["split"].endswith(":test") and (tmp_path / "ga" / "mask.json").is_file()


@pytest.mark.parametrize("name", ["altclip", "metaclip2", "towers"])
def test_class_token_families_decompose_exactly(family_models, pixels, name):
    """The per-head decomposition (TextSpan's convention) sums to the library's embedding, divided by its norm."""
    from clipheads.explain.decomposition import decompose

    backend = family_models[name]
    with torch.inference_mode():
        embedding = backend.encode_image(pixels)
    total = decompose(backend, pixels).total()
    assert (total - embedding / embedding.norm(dim=-1, keepdim=True)).abs().max() <= 1e-5


def test_a_long_text_is_truncated_to_what_the_text_tower_takes(family):
    """AltCLIP's RoBERTa positions start after the padding index: its last two positions hold no token."""
    with torch.inference_mode():
        long = family.encode_text(["a red circle " * 40])
        cut = family.encode_text(family.tokenize(["a red circle " * 40]))
    assert long.shape == (1, 64) and torch.equal(long, cut)
    assert family.tokenize(["a red circle " * 40])["input_ids"].shape[1] <= family._text_positions()


# ----------------------------------------------------------------- Siglip2: NaFlex inputs
def naive_naflex(backend, inputs, gates, op: str, alpha: float = 0.0, means=None) -> torch.Tensor:
    """Explicit attention per head with the padding keys masked out, edited as the operators do (see
    ``tests/interventions/test_reference.py``), then the pooling head over the valid tokens."""
    vision = backend.model.vision_model
    heads, d = backend.n_heads, backend.head_dim
    x = vision.embeddings(inputs["pixel_values"], inputs["spatial_shapes"])
    batch, tokens, width = x.shape
    keep = inputs["pixel_attention_mask"].bool()
    bias = torch.zeros(batch, 1, 1, tokens).masked_fill(~keep[:, None, None, :], float("-inf"))
    for index, layer in enumerate(vision.encoder.layers):
        attn_module = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (proj(h).view(batch, tokens, heads, d).transpose(1, 2)
                   for proj in (attn_module.q_proj, attn_module.k_proj, attn_module.v_proj))
        attn = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5 + bias, dim=-1)
        if op == "identity":
            edited = torch.eye(tokens).expand_as(attn)
        elif op == "cls":
            edited = torch.zeros_like(attn)
            edited[..., 0] = 1.0
        elif op == "scale":
            edited = alpha * attn
        else:
            edited = torch.zeros_like(attn)
        g = gates[index].view(1, heads, 1, 1)
        z = (g * attn + (1 - g) * edited) @ v
        if op == "mean":
            z = z + (1 - g) * means[index].view(1, heads, 1, d)
        x = x + attn_module.out_proj(z.transpose(1, 2).reshape(batch, tokens, width))
        x = x + layer.mlp(layer.layer_norm2(x))
    return vision.head(vision.post_layernorm(x), inputs["pixel_attention_mask"])


@pytest.fixture(scope="module")
def naflex(family_models):
    """Three images of other aspect ratios than square through the model's own Siglip2ImageProcessor: padded."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 16), (40, 40),
                                                                                           (16, 48)]]
    backend = family_models["siglip2"]
    inputs = backend.preprocess_naflex(images)
    assert not inputs["pixel_attention_mask"].bool().all(), "the inputs must hold padding"
    return backend, inputs


def test_naflex_all_ones_is_the_library_bit_for_bit(naflex):
    backend, inputs = naflex
    with torch.inference_mode():
        library = backend.model.get_image_features(**inputs).pooler_output
        vanilla = backend.encode_image(inputs)
        with clipheads.ablate(backend, clipheads.HeadMask.ones(backend)):
            ones = backend.encode_image(inputs)
        naive = naive_naflex(backend, inputs, torch.ones(2, 4), "identity")
    assert torch.equal(vanilla, library) and torch.equal(ones, library)
    assert (naive - library).abs().max() <= 1e-5


@pytest.mark.parametrize("op", OPERATORS)
def test_naflex_operators_match_naive_reference(naflex, op):
    backend, inputs = naflex
    if op == "cls":  # no class token: refused in one line
        mask = clipheads.HeadMask.from_heads("L0.H0", backend)
        with pytest.raises(OperatorError, match="needs a class token"), clipheads.ablate(backend, mask, op=op):
            backend.encode_image(inputs)
        return
    torch.manual_seed(2)
    gates = torch.rand(2, 4)
    gates[0, 0] = 0.0
    means = torch.randn(2, 4, backend.head_dim) if op == "mean" else None
    mask = clipheads.HeadMask.from_tensor(gates, backend)
    with torch.no_grad():
        expected = naive_naflex(backend, inputs, gates, op, alpha=0.3, means=means)
        with clipheads.ablate(backend, mask, op=op, alpha=0.3, means=means):
            got = backend.encode_image(inputs)
        vanilla = backend.encode_image(inputs)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - vanilla).abs().max() > 1e-3


def test_siglip2_fixed_grid_is_the_processor_on_square_images(family_models):
    """PIL images go in as the processor prepares them, resized to the model's square grid first."""
    backend = family_models["siglip2"]
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    inputs = backend.preprocess_naflex(images)
    assert inputs["pixel_attention_mask"].bool().all() and inputs["spatial_shapes"].tolist() == [[4, 4]] * 2
    with torch.inference_mode():
        assert torch.equal(backend.encode_image(images), backend.model.get_image_features(**inputs).pooler_output)


def test_naflex_inputs_of_another_patch_size_are_one_line(naflex):
    backend, inputs = naflex
    bad = dict(inputs, pixel_values=inputs["pixel_values"][..., :-1])
    with pytest.raises(clipheads.ClipHeadsError, match="patch size 8") as info:
        backend.encode_image(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(clipheads.ClipHeadsError, match="without spatial_shapes"):
        backend.encode_image({k: v for k, v in inputs.items() if k != "spatial_shapes"})


# ----------------------------------------------------------------- the towers used apart
def test_towers_are_the_clip_model_of_the_same_weights(family_models, pixels):
    """The towers' embeddings are those of a CLIPModel holding the same weights."""
    from transformers import CLIPConfig, CLIPModel

    towers = family_models["towers"]
    config = CLIPConfig(text_config=towers.model.text.config.to_dict(),
                        vision_config=towers.model.vision.config.to_dict(), projection_dim=64)
    clip = CLIPModel(config).eval()
    missing, unexpected = clip.load_state_dict({**towers.model.vision.state_dict(), **towers.model.text.state_dict()},
                                               strict=False)
    assert missing == ["logit_scale"] and unexpected == []
    tokens = towers.tokenize(["a red circle", "a dog"])
    with torch.inference_mode():
        assert torch.equal(towers.encode_image(pixels), clip.get_image_features(pixel_values=pixels).pooler_output)
        assert torch.equal(towers.encode_text(tokens), clip.get_text_features(**tokens).pooler_output)
    assert towers.logit_scale == 100.0


def test_towers_load_from_two_folders_and_as_models(family_models, tmp_path, pixels):
    towers = family_models["towers"]
    towers.model.vision.save_pretrained(tmp_path / "v")
    towers.model.text.save_pretrained(tmp_path / "t")
    towers.tokenizer.save_pretrained(tmp_path / "t")
    from_folders = clipheads.load((tmp_path / "v", tmp_path / "t"))
    from_models = clipheads.load((towers.model.vision, towers.model.text), tokenizer=towers.tokenizer)
    with torch.inference_mode():
        expected = towers.encode_image(pixels)
        for loaded in (from_folders, from_models):
            assert type(loaded).__name__ == "HFTowersBackend"
            assert torch.equal(loaded.encode_image(pixels), expected)
            assert torch.equal(loaded.encode_text(["a cat"]), towers.encode_text(["a cat"]))


def test_a_tower_without_projection_or_alone_is_one_line(family_models, tmp_path):
    from transformers import CLIPVisionModel

    towers = family_models["towers"]
    CLIPVisionModel(towers.model.vision.config).save_pretrained(tmp_path / "bare")
    towers.model.text.save_pretrained(tmp_path / "t")
    with pytest.raises(clipheads.ModelLoadError, match="has no visual_projection") as info:
        clipheads.load((tmp_path / "bare", tmp_path / "t"))
    assert "\n" not in str(info.value)
    for alone in (towers.model.vision, str(tmp_path / "bare")):
        with pytest.raises(clipheads.ModelLoadError, match=r"clipheads.load\(\(vision, text\)\)") as info:
            clipheads.load(alone)
        assert "\n" not in str(info.value)
    with pytest.raises(clipheads.ModelLoadError, match="must be a CLIPTextModelWithProjection"):
        clipheads.load((towers.model.vision, towers.model.vision))
