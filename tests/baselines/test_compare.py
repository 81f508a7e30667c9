"""AAT against fine-tuning: what each row counts, that checkpoints reproduce the reported numbers, refusals, plots."""

from __future__ import annotations

import json

import pytest
import torch

from clipheads.baselines import CompareConfig, FinetuneConfig, compare_baselines, finetune, parse_methods
from clipheads.baselines.plots import plot_comparison
from clipheads.errors import ClipHeadsError
from clipheads.interventions import HeadMask
from clipheads.models.random_init import tiny_model
from clipheads.search import BPConfig, GAConfig, MaskEvaluator, SearchData, retrieval_objective

WORDS = ["red", "green", "blue", "yellow", "black", "white", "pink", "grey", "brown", "cyan", "lime", "navy"]


def _split(backend, name: str, n: int, seed: int) -> SearchData:
    """``n`` random images with two captions each (the layout of the bundled world)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, backend.image_size, backend.image_size, generator=generator)
    captions = [f"a {WORDS[(i + seed) % len(WORDS)]} {shape} {i}" for i in range(n) for shape in ("circle", "star")]
    with torch.inference_mode():
        texts = backend.encode_text(captions).clone()
    text_to_image = torch.arange(n).repeat_interleave(2)
    return SearchData(name, pixels, retrieval_objective(texts, text_to_image), (texts, text_to_image))


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    backend = tiny_model("hf", seed=3)
    train, val, test = _split(backend, "train", 12, 0), _split(backend, "val", 6, 1), _split(backend, "test", 6, 2)
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    config = CompareConfig(methods=("vanilla", "aat-ga", "aat-bp", "lora-r2", "ia3", "full"), epochs=2,
                           batch_size=4, full_lr=1e-3, eval_batch_size=8,
                           ga=GAConfig(population=4, generations=2), bp=BPConfig(epochs=2, batch_size=4))
    folder = tmp_path_factory.mktemp("compare")
    result = compare_baselines(backend, train, val, test, config, checkpoint_dir=folder)
    return backend, before, (train, val, test), result, folder


def test_rows_count_bits_for_masks_and_only_adapters_for_peft(compared):
    backend, _, _, result, _ = compared
    assert [r.method for r in result.rows] == ["vanilla", "aat-ga", "aat-bp", "lora-r2", "ia3", "full"]
    for method in ("aat-ga", "aat-bp"):
        row = result.row(method)
        assert (row.trainable_params, row.params_unit, row.family) == (2 * 4, "bits", "ablation")
    width, layers = backend.architecture.width, backend.n_layers
    lora = result.row("lora-r2")
    assert lora.trainable_params == layers * 4 * (2 * (width + width))  # q, k, v, out: A r x in, B out x r
    vision = sum(p.numel() for p in backend.model.vision_model.parameters())
    assert result.row("full").trainable_params == vision + backend.model.visual_projection.weight.numel()
    assert 0 < result.row("ia3").trainable_params < lora.trainable_params < result.row("full").trainable_params
    assert result.row("vanilla").trainable_params == 0 and result.row("vanilla").wall_time_s == 0


def test_vanilla_is_the_untouched_model_and_backend_is_never_modified(compared):
    backend, before, (_, val, test), result, _ = compared
    after = backend.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert backend.intervention is None and not backend.hooked_layers
    for data, value in ((val, result.row("vanilla").val_mean_recall), (test, result.row("vanilla").test_mean_recall)):
        assert value == pytest.approx(MaskEvaluator(backend, data.pixels, data.objective).baseline)


def test_epoch_curves_and_held_out_numbers_come_from_the_saved_checkpoints(compared):
    from peft import PeftModel

    _, _, (_, val, test), result, folder = compared
    for method in ("lora-r2", "ia3", "full"):
        row = result.row(method)
        assert [e["epoch"] for e in row.per_epoch] == [1, 2]
        assert row.val_mean_recall == row.per_epoch[-1]["val_mean_recall"]
        assert 0 < row.wall_time_s <= row.extra["wall_time_with_validation_s"]
    fresh = tiny_model("hf", seed=3)
    PeftModel.from_pretrained(fresh.model, folder / "lora-r2").eval()
    with torch.inference_mode():
        got = float(test.objective(fresh.encode_image(test.pixels)))
    assert got == pytest.approx(result.row("lora-r2").test_mean_recall)
    from transformers import CLIPModel

    full = tiny_model("hf", seed=3)
    full.model = CLIPModel.from_pretrained(folder / "full").eval()
    with torch.inference_mode():
        assert float(val.objective(full.encode_image(val.pixels))) == pytest.approx(result.row("full").val_mean_recall)
    mask = HeadMask.load(folder / "aat-ga" / "mask.json")
    assert mask.ablated == result.row("aat-ga").extra["ablated"]


def test_result_is_json_and_table_and_plots_are_written(compared, tmp_path):
    _, _, _, result, _ = compared
    data = json.loads(json.dumps(result.to_dict()))
    assert data["rows"][3]["method"] == "lora-r2" and data["config"]["ga"]["population"] == 4
    markdown = result.markdown()
    assert markdown.count("\n| ") == len(result.rows) + 1 and "| aat-ga | 8 bits |" in markdown
    for path in plot_comparison(result, tmp_path):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_training_split_as_held_out_unless_told():
    backend = tiny_model("hf", seed=4)
    train, val = _split(backend, "train", 6, 0), _split(backend, "val", 6, 1)
    config = CompareConfig(methods=("vanilla",))
    with pytest.raises(ClipHeadsError, match="training split and the held-out split"):
        compare_baselines(backend, train, val, train, config)
    with pytest.raises(ClipHeadsError, match="validation split"):
        compare_baselines(backend, train, _split(backend, "train", 6, 1), val, config)
    result = compare_baselines(backend, train, val, train, config, allow_same_split=True)
    assert result.test_split == "train"


def test_method_names_are_checked():
    assert parse_methods("vanilla, aat-ga,LORA-R16,full") == ["vanilla", "aat-ga", "lora-r16", "full"]
    for bad in ("lora", "lora-r0", "adapter", "", "full,full"):
        with pytest.raises(ClipHeadsError):
            parse_methods(bad)
    assert CompareConfig(lora_alpha_per_rank=2).finetune_config("lora-r4").lora_alpha == 8
    assert CompareConfig(lr=1e-3, full_lr=1e-4).finetune_config("full").learning_rate() == 1e-4


def test_finetune_draws_one_caption_per_image_each_epoch():
    backend = tiny_model("hf", seed=5)
    data = _split(backend, "train", 8, 0)
    texts, text_to_image = data.pairs
    _, result = finetune(backend, data.pixels, texts, FinetuneConfig(method="lora", rank=2, epochs=2, batch_size=4),
                         text_to_image=text_to_image)
    assert len(result.history) == 2
    with pytest.raises(ClipHeadsError, match="text_to_image"):
        finetune(backend, data.pixels, texts, FinetuneConfig(epochs=1), text_to_image=text_to_image[:-1])
    with pytest.raises(ClipHeadsError, match="matched pairs"):
        finetune(backend, data.pixels, texts, FinetuneConfig(epochs=1))
