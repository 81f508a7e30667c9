"""Loading like the libraries: dtype, attn_implementation, revision, cache_dir (transformers) and precision,
force_image_size, force_quick_gelu, cache_dir (open_clip) reach the library's own loader."""

from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

import clipheads
from clipheads.cli import app
from clipheads.models.openclip import TINY_OPEN_CLIP
from clipheads.models.random_init import save_hf, tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clip") / "model"
    save_hf(tiny_model("hf", seed=2), path)
    return path


@pytest.fixture()
def hub_cache(folder, tmp_path):
    """A Hugging Face cache in huggingface_hub's layout holding ``org/tiny``: ``main`` is the saved model, ``v1``
    the same model with its visual projection zeroed."""
    from safetensors.torch import load_file, save_file

    repo = tmp_path / "cache" / "models--org--tiny"
    for ref, commit in (("main", "a" * 40), ("v1", "b" * 40)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(folder, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    weights = repo / "snapshots" / ("b" * 40) / "model.safetensors"
    state = load_file(weights)
    state["visual_projection.weight"] = torch.zeros_like(state["visual_projection.weight"])
    save_file(state, weights, metadata={"format": "pt"})
    return tmp_path / "cache"


def test_dtype_is_given_to_from_pretrained(folder, monkeypatch):
    """The weights are created in bf16 by transformers (no fp32 copy first): from_pretrained gets dtype."""
    from transformers import CLIPModel

    seen = []
    original = CLIPModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(spy))
    backend = clipheads.load(str(folder), dtype="bf16")
    assert seen == [torch.bfloat16]
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}


def test_attn_implementation_is_the_models(folder, pixels):
    eager = clipheads.load(str(folder), attn_implementation="eager")
    sdpa = clipheads.load(str(folder))
    assert eager.model.vision_model.config._attn_implementation == "eager"
    assert sdpa.model.vision_model.config._attn_implementation == "sdpa"
    mask = clipheads.HeadMask.from_heads("L1.H2", eager)
    with torch.inference_mode():
        assert (eager.encode_image(pixels) - sdpa.encode_image(pixels)).abs().max() <= 1e-5
        with clipheads.ablate(eager, mask, op="zero"), clipheads.ablate(sdpa, mask, op="zero"):
            assert (eager.encode_image(pixels) - sdpa.encode_image(pixels)).abs().max() <= 1e-5
    assert eager.model.vision_model.config._attn_implementation == "eager"  # restored after the ablation


def test_revision_and_cache_dir_read_the_cache_given(hub_cache, pixels):
    main = clipheads.load("org/tiny", cache_dir=hub_cache)
    v1 = clipheads.load("org/tiny", cache_dir=hub_cache, revision="v1")
    with torch.inference_mode():
        assert main.encode_image(pixels).abs().max() > 0
        assert torch.equal(v1.encode_image(pixels), torch.zeros(3, v1.model.config.projection_dim))
    assert main.tokenizer is not None and v1.tokenizer is not None
    with pytest.raises(clipheads.ModelLoadError) as info:
        clipheads.load("org/tiny", cache_dir=hub_cache, revision="v2")
    assert "\n" not in str(info.value)


def test_cli_options_reach_the_loader(hub_cache, run_main):
    code, out, err = run_main("info", "--model", "org/tiny", "--model-cache-dir", hub_cache, "--revision", "v1",
                              "--attn-implementation", "eager")
    assert code == 0, err
    assert "L0.H0 .. L1.H3" in out
    code, _, err = run_main("info", "--model", "org/tiny", "--model-cache-dir", hub_cache, "--revision", "v2")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_cli_load_options_are_on_the_commands_with_a_model():
    for command in ("info", "eval", "search", "scan", "bake", "describe", "maps"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert all(opt in result.output for opt in ("--attn-implementation", "--revision", "--model-cache-dir"))


def test_open_clip_options_reach_create_model_and_transforms(monkeypatch, tmp_path):
    import open_clip

    seen = {}
    original = open_clip.create_model_and_transforms

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy)
    name = f"open_clip:{TINY_OPEN_CLIP}"
    backend = clipheads.load(name, precision="pure_bf16", force_image_size=48, force_quick_gelu=True,
                             cache_dir=tmp_path)
    assert seen["cache_dir"] == str(tmp_path) and seen["precision"] == "pure_bf16"
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    assert backend.image_size == 48
    mlp = backend.model.visual.transformer.resblocks[0].mlp
    assert type(mlp.gelu).__name__ == "QuickGELU"
    plain = clipheads.load(name)
    assert plain.image_size == 32 and type(plain.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"


def test_options_of_the_other_library_are_one_line(folder):
    cases = [(f"open_clip:{TINY_OPEN_CLIP}", {"attn_implementation": "eager"}, "transformers"),
             (f"open_clip:{TINY_OPEN_CLIP}", {"revision": "main"}, "transformers"),
             (str(folder), {"precision": "fp16"}, "open_clip"),
             (str(folder), {"force_quick_gelu": True}, "open_clip"),
             (tiny_model("hf").model, {"revision": "main"}, "already built")]
    for source, options, what in cases:
        with pytest.raises(clipheads.ModelLoadError, match=what) as info:
            clipheads.load(source, **options)
        assert "\n" not in str(info.value)


def test_open_clip_hub_repo_is_read_from_the_cache_dir_given(tmp_path, pixels):
    """``hf-hub:org/repo`` with ``cache_dir``: the snapshot in that cache (open_clip's own layout) is what loads."""
    tiny = tiny_model("open_clip", seed=4)
    repo = tmp_path / "cache" / "models--org--tiny-open-clip"
    clipheads.save(tiny, repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    loaded = clipheads.load("hf-hub:org/tiny-open-clip", cache_dir=tmp_path / "cache")
    with torch.inference_mode():
        assert torch.equal(loaded.encode_image(pixels), tiny.encode_image(pixels))
    with pytest.raises(clipheads.ModelLoadError) as info:
        clipheads.load("hf-hub:org/tiny-open-clip", cache_dir=tmp_path / "elsewhere")
    assert "\n" not in str(info.value)


def test_a_model_cache_dir_that_is_a_file_is_a_usage_error(tmp_path, run_main):
    (tmp_path / "file").write_text("")
    code, _, err = run_main("info", "--model-cache-dir", tmp_path / "file", forbid_load=True)
    assert code == 2 and "--model-cache-dir" in err


def test_results_record_the_loading_options():
    from clipheads.models import load_options
    from clipheads.runtime import run_meta

    assert "load_options" not in run_meta()
    with load_options(revision="v1", attn_implementation="eager", cache_dir="/somewhere"):
        assert run_meta()["load_options"] == {"revision": "v1", "attn_implementation": "eager"}


def test_an_unknown_attn_implementation_is_one_line(folder):
    with pytest.raises(clipheads.ModelLoadError, match="nonsense") as info:
        clipheads.load(str(folder), attn_implementation="nonsense")
    assert "\n" not in str(info.value)
