"""Fine-tuning baselines: peft adapters only change adapter parameters, counts are right, save/load round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

import clipheads
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


def _hand_merged(tuned_backend, base):
    """``base`` with every trained LoRA update ``W + scaling * B @ A`` written into its weights by hand."""
    merged = copy.deepcopy(base)
    plain = dict(merged.named_modules())
    with torch.no_grad():
        for name, module in tuned_backend.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                target = getattr(module, "parameter_name", "weight")  # ParamWrapper: in_proj_weight of the MHA
                getattr(plain[name], target).add_(delta)
    return merged


@pytest.mark.parametrize("kind", ["hf", "open_clip", "siglip"])
def test_lora_is_what_lora_means(kind):
    """The tuned encoder equals the base model with W + dW (by hand), whatever peft's MultiheadAttention does."""
    backend = make_tiny(kind, seed=5)
    base = copy.deepcopy(backend.model)
    pixels, texts = _pairs(backend)
    tuned, _ = finetune(backend, pixels, texts, FinetuneConfig(method="lora", rank=2, epochs=2, batch_size=4))
    merged = clipheads.load(_hand_merged(tuned, base))
    with torch.inference_mode():
        got, expected = tuned.encode_image(pixels), merged.encode_image(pixels)
        untuned = clipheads.load(base).encode_image(pixels)
    assert (expected - untuned).abs().max() > 1e-4  # training moved the adapters
    assert (got - expected).abs().max() <= 1e-5


def test_lora_parameter_count_on_open_clip_matches_formula():
    backend = make_tiny("open_clip")
    _, n_trainable, _ = prepare_model(backend, FinetuneConfig(method="lora", rank=4))
    width, layers = backend.architecture.width, backend.n_layers
    assert n_trainable == layers * 4 * (width + 3 * width)  # packed in_proj [3W, W]: A r x W, B 3W x r


@pytest.mark.parametrize("kind", ["hf", "open_clip", "siglip"])
@pytest.mark.parametrize("method", ["lora", "ia3", "full"])
def test_every_trained_parameter_changes_the_output(kind, method):
    """Each adapter tensor moves the image embedding (from a trained-like state: LoRA's B starts at zero); full
    fine-tuning also trains the key biases, which softmax ignores (adding a constant to every score of a query)."""
    backend = make_tiny(kind, seed=9)
    trained, n_trainable, _ = prepare_model(backend, FinetuneConfig(method=method, rank=2))
    pixels = torch.randn(2, 3, backend.image_size, backend.image_size)
    params = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in params) == n_trainable
    with torch.no_grad():
        for _, param in params:
            param.add_(0.5 * torch.randn_like(param))
        reference = backend.encode_image(pixels)
        dead = []
        for name, param in params:
            saved = param.detach().clone()
            param.add_(torch.randn_like(param))
            if (backend.encode_image(pixels) - reference).abs().max() <= 1e-6:
                dead.append(name)
            param.copy_(saved)
    if method == "full":
        dead = [n for n in dead if not n.endswith("k_proj.bias")]
    assert not dead, f"trained parameters that do not change the output: {dead[:3]}"


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
