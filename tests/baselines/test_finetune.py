"""Fine-tuning baselines: peft adapters only change adapter parameters, counts are right, save/load round-trips."""

from __future__ import annotations

import pytest
import torch

from clipheads.baselines import FinetuneConfig, finetune, prepare_model
from clipheads.models.random_init import tiny_model as make_tiny


def _pairs(backend, n=8):
    torch.manual_seed(0)
    pixels = torch.randn(n, 3, backend.image_size, backend.image_size)
    with torch.inference_mode():
        texts = backend.encode_text([f"a red circle {w}" for w in ["one", "two", "three", "left", "right",
                                                                     "top", "bottom", "cat"][:n]]).clone()
    return pixels, texts


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_lora_changes_only_adapter_parameters(kind):
    backend = make_tiny(kind, seed=5)
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    pixels, texts = _pairs(backend)
    tuned, result = finetune(backend, pixels, texts, FinetuneConfig(method="lora", rank=2, epochs=2, batch_size=4))
    after = tuned.model.state_dict()
    adapters = [k for k in after if "lora_" in k]
    assert adapters, "LoRA layers must be injected"
    base_after = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert set(base_after) == set(before)
    # peft's nn.MultiheadAttention LoRA merges and unmerges the packed in_proj around each forward: float
    # round-off of ~1e-8 on the base weights, far below any training update
    changed = [k for k, v in before.items() if (v - base_after[k]).abs().max() > 1e-6]
    assert not changed, f"only adapter parameters may change, but {changed[:3]} did"
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if "lora_B" in k)
    assert result.trainable_params == sum(after[k].numel() for k in adapters)
    assert len(result.history) == 2


def test_lora_parameter_count_on_hf_matches_formula():
    backend = make_tiny("hf")
    model, n_trainable, n_total = prepare_model(backend, FinetuneConfig(method="lora", rank=4))
    width, layers = backend.architecture.width, backend.n_layers
    assert n_trainable == layers * 4 * (4 * (width + width))  # q, k, v, out per layer, A: r x in, B: out x r
    assert n_total > n_trainable


def test_full_finetune_trains_only_the_image_tower():
    backend = make_tiny("hf", seed=6)
    text_before = {k: v.clone() for k, v in backend.model.text_model.state_dict().items()}
    pixels, texts = _pairs(backend)
    _, result = finetune(backend, pixels, texts, FinetuneConfig(method="full", epochs=1, batch_size=4, lr=1e-3))
    assert all(torch.equal(v, backend.model.text_model.state_dict()[k]) for k, v in text_before.items())
    vision = sum(p.numel() for p in backend.model.vision_model.parameters())
    assert result.trainable_params == vision + backend.model.visual_projection.weight.numel()


def test_lora_adapter_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    backend = make_tiny("hf", seed=7)
    pixels, texts = _pairs(backend)
    tuned, _ = finetune(backend, pixels, texts, FinetuneConfig(method="lora", rank=2, epochs=1, batch_size=4),
                        out_dir=tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    fresh = make_tiny("hf", seed=7)
    reloaded = PeftModel.from_pretrained(fresh.model, tmp_path / "lora").eval()
    with torch.inference_mode():
        expected = tuned.encode_image(pixels)
        got = fresh.encode_image(pixels)
    assert reloaded is not None and (got - expected).abs().max() <= 1e-5


def test_ia3_trains_few_parameters():
    backend = make_tiny("hf", seed=8)
    pixels, texts = _pairs(backend)
    _, result = finetune(backend, pixels, texts, FinetuneConfig(method="ia3", epochs=1, batch_size=4))
    assert 0 < result.trainable_params < 2000


def test_every_pair_is_trained_on_each_epoch_even_with_a_partial_last_batch():
    backend = make_tiny("hf", seed=6)
    pixels, texts = _pairs(backend, n=7)
    seen: list[int] = []
    encode = backend.encode_image

    def counting(batch, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps, not validation
            seen.append(len(batch))
        return encode(batch, *args, **kwargs)

    backend.encode_image = counting
    finetune(backend, pixels, texts, FinetuneConfig(method="lora", rank=2, epochs=2, batch_size=3))
    assert seen == [3, 3, 1] * 2  # the captioner's and AAT-BP's rule: round up, nothing dropped
