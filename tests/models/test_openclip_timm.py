"""open_clip towers on timm trunks (SigLIP's AttentionPoolLatent, EVA02's rope + SwiGLU + sub-LN, EVA01's packed
qkv with biases): the operators against a naive explicit-attention reference, exactness, fast path, bake, info,
save/load and a demo-size search, on tiny copies of the real configs (clipheads.models.tiny_copies)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clipheads
from clipheads.errors import ClipHeadsError, ModelLoadError
from clipheads.interventions import OPERATORS
from clipheads.models.tiny_copies import TINY_TIMM_CONFIGS, tiny_timm_open_clip

CONFIGS = tuple(TINY_TIMM_CONFIGS)  # ViT-B-16-SigLIP, EVA02-B-16, EVA01-g-14, EVA02-E-14


@pytest.fixture(scope="module", params=CONFIGS)
def timm_backend(request):
    return tiny_timm_open_clip(request.param)


@pytest.fixture(scope="module")
def siglip():
    return tiny_timm_open_clip("ViT-B-16-SigLIP")


@pytest.fixture(scope="module")
def eva02():
    return tiny_timm_open_clip("EVA02-B-16")


def _qkv(attn, h):
    """q, k, v ``[B, H, T, d]`` read off timm's modules (packed, packed with q/v biases, or separate)."""
    batch, tokens = h.shape[:2]
    shape = (batch, tokens, attn.num_heads, attn.head_dim)
    if getattr(attn, "q_proj", None) is not None:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if getattr(attn, "q_bias", None) is not None \
            else attn.qkv.bias
        q, k, v = F.linear(h, attn.qkv.weight, bias).chunk(3, dim=-1)
    return (t.reshape(shape).transpose(1, 2) for t in (q, k, v))


def naive_encode(backend, pixels, gates, op: str, alpha: float = 0.0, means=None):
    """Reference forward: each head's softmax(q k^T / sqrt(d)) built explicitly (after q/k norms and EVA's rope),
    edited by the operator and mixed with the soft gate; then timm's attn.norm, proj and the block's MLP."""
    from timm.layers import apply_rot_embed_cat

    trunk = backend.model.visual.trunk
    heads, d = backend.n_heads, backend.head_dim
    x = trunk.patch_embed(pixels)
    eva = type(trunk).__name__ == "Eva"
    x, rope = trunk._pos_embed(x) if eva else (trunk._pos_embed(x), None)
    x = trunk.norm_pre(x)
    batch, tokens, _ = x.shape
    for layer, block in enumerate(trunk.blocks):
        attn = block.attn
        post_norm = type(block).__name__ == "EvaBlockPostNorm"
        q, k, v = _qkv(attn, x if post_norm else block.norm1(x))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            n = attn.num_prefix_tokens
            q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope)], dim=2)
            k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope)], dim=2)
        weights = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)  # [B, H, T, T]
        if op == "identity":
            edited = torch.eye(tokens).expand_as(weights)
        elif op == "cls":
            edited = torch.zeros_like(weights)
            edited[..., 0] = 1.0  # every query attends only to the first token (the class token where there is one)
        elif op == "scale":
            edited = alpha * weights
        else:
            edited = torch.zeros_like(weights)
        g = gates[layer].view(1, heads, 1, 1)
        z = (g * weights + (1 - g) * edited) @ v
        if op == "mean":
            z = z + (1 - g) * means[layer].view(1, heads, -1, d)
        out = attn.proj(attn.norm(z.transpose(1, 2).reshape(batch, tokens, heads * d)))
        if post_norm:
            x = x + block.norm1(out)
            x = x + block.norm2(block.mlp(x))
        elif eva:
            x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
            mlp = block.mlp(block.norm2(x))
            x = x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)
        else:
            x = x + block.ls1(out)
            x = x + block.ls2(block.mlp(block.norm2(x)))
    return backend.model.visual.head(trunk.forward_head(trunk.norm(x)))


def test_tiny_copies_keep_the_real_blocks(timm_backend):
    from timm.layers import Attention, AttentionPoolLatent
    from timm.models.eva import EvaAttention

    trunk = timm_backend.model.visual.trunk
    attn = trunk.blocks[0].attn
    assert timm_backend.kind == "open_clip-timm"
    assert (timm_backend.n_layers, timm_backend.n_heads, timm_backend.head_dim) == (2, 4, 16)
    if timm_backend.name.startswith("open_clip:ViT-B-16-SigLIP"):
        assert type(attn) is Attention and isinstance(trunk.attn_pool, AttentionPoolLatent)
        assert trunk.cls_token is None and timm_backend.readout_tokens is None
    else:
        assert type(attn) is EvaAttention and timm_backend.readout_tokens == 1
    if timm_backend.name.startswith("open_clip:EVA02-B"):
        assert trunk.rope is not None and attn.q_proj is not None and not isinstance(attn.norm, torch.nn.Identity)
    if timm_backend.name.startswith("open_clip:EVA02-E"):
        assert type(trunk.blocks[0]).__name__ == "EvaBlockPostNorm" and trunk.rope is None
    if timm_backend.name.startswith("open_clip:EVA01"):
        assert attn.q_bias is not None and attn.qkv is not None  # timm's F.linear path, qkv never called


@pytest.mark.parametrize("op", OPERATORS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_operator_matches_naive_reference(timm_backend, pixels, op, soft):
    if op == "cls" and not timm_backend.has_class_token:
        pytest.skip("no class token: cls is refused (test_cls_is_refused_without_a_class_token)")
    torch.manual_seed(0)
    shape = (timm_backend.n_layers, timm_backend.n_heads)
    gates = torch.rand(shape) if soft else (torch.rand(shape) > 0.5).float()
    gates[0, 0] = 0.0
    means = torch.randn(*shape, timm_backend.head_dim) if op == "mean" else None
    mask = clipheads.HeadMask.from_tensor(gates, timm_backend)
    with torch.no_grad():
        expected = naive_encode(timm_backend, pixels, gates, op, alpha=0.3, means=means)
        with clipheads.ablate(timm_backend, mask, op=op, alpha=0.3, means=means):
            got = timm_backend.encode_image(pixels)
        vanilla = timm_backend.encode_image(pixels)
    scale = vanilla.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    assert (got - vanilla).abs().max() > 1e-3 * scale, "the intervention must change the output"


def test_all_ones_is_the_library_bit_for_bit(timm_backend, pixels):
    """No hook for an all-ones mask; hooks with gates of one (every layer hooked) change no bit either; the naive
    reference with all ones is the library up to rounding."""
    model = timm_backend.model
    ones = clipheads.HeadMask.ones(timm_backend)
    with torch.no_grad():
        library = model.encode_image(pixels)
        with clipheads.ablate(timm_backend, ones):
            assert timm_backend.hooked_layers == []
            assert torch.equal(timm_backend.encode_image(pixels), library)
        gates = torch.ones(timm_backend.n_layers, timm_backend.n_heads, requires_grad=True)
        with clipheads.ablate(timm_backend, clipheads.HeadMask.from_tensor(gates, timm_backend), op="identity"):
            assert timm_backend.hooked_layers == [0, 1]
            assert torch.equal(timm_backend.encode_image(pixels), library)
        assert timm_backend.hooked_layers == []
        assert torch.equal(model.encode_image(pixels), library)
        reference = naive_encode(timm_backend, pixels, torch.ones(2, 4), "identity")
    assert (reference - library).abs().max() <= 1e-5 * library.abs().max()


@pytest.mark.parametrize("op", ["identity", "cls", "mean"])
def test_timm_explicit_softmax_path(timm_backend, pixels, op):
    """timm's non-fused branch (fused_attn False: explicit softmax, as with TIMM_FUSED_ATTN=0) is hooked the same
    way: exact with all ones, and the operators match the naive reference."""
    import copy

    if op == "cls" and not timm_backend.has_class_token:
        pytest.skip("no class token: cls is refused (test_cls_is_refused_without_a_class_token)")
    backend = clipheads.load(copy.deepcopy(timm_backend.model))
    for block in backend.model.visual.trunk.blocks:
        block.attn.fused_attn = False
    gates = torch.tensor([[0.0, 1.0, 0.5, 1.0], [1.0, 0.0, 1.0, 1.0]])
    means = torch.randn(2, 4, 16)
    mask = clipheads.HeadMask.from_tensor(gates, backend)
    with torch.no_grad():
        library = backend.model.encode_image(pixels)
        with clipheads.ablate(backend, clipheads.HeadMask.from_tensor(torch.ones(2, 4).requires_grad_(), backend)):
            assert torch.equal(backend.encode_image(pixels), library)
        with clipheads.ablate(backend, mask, op=op, means=means):
            got = backend.encode_image(pixels)
        expected = naive_encode(backend, pixels, gates, op, means=means)
    assert (got - expected).abs().max() <= 1e-5 * library.abs().max()


@pytest.mark.parametrize("op", ["identity", "zero", "scale"])
def test_staged_and_split_paths_match_the_library(timm_backend, pixels, op):
    """The staged view and the fast path's split layers (EVA: read-out token only) give encode_image's result."""
    mask = clipheads.HeadMask.from_heads(["L0.H1", "L1.H2"], timm_backend)
    with torch.no_grad():
        plain = timm_backend.encode_image(pixels)
        assert torch.equal(timm_backend.encode_image_staged(pixels), plain)
        with clipheads.ablate(timm_backend, mask, op=op, alpha=0.3):
            ablated = timm_backend.encode_image(pixels)
            staged = timm_backend.encode_image_staged(pixels)
            readout = timm_backend.encode_image_readout(pixels)
            x = timm_backend.embed(pixels)
            split = timm_backend.pool(timm_backend.run_layer_split(1, timm_backend.run_layer_split(0, x)))
    scale = plain.abs().max()
    assert timm_backend.supports_layer_split
    for other in (staged, readout, split):
        assert (other - ablated).abs().max() <= 1e-6 * scale


def test_gate_gradients_match_finite_differences(timm_backend, pixels):
    """The gates' gradients through the hooks (what AAT-BP and the attribution scan use) are the derivatives of the
    output: d loss / d gate of two heads against central differences, in float64."""
    import copy

    backend = clipheads.load(copy.deepcopy(timm_backend.model), dtype=torch.float64)
    pixels = pixels.double()
    weight = torch.randn(backend.model.encode_image(pixels[:1]).shape[-1], dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))

    def loss(gates: torch.Tensor) -> torch.Tensor:
        with clipheads.ablate(backend, clipheads.HeadMask.from_tensor(gates, backend), op="identity"):
            return (backend.encode_image(pixels) * weight).sum()

    gates = torch.full((2, 4), 0.7, dtype=torch.float64, requires_grad=True)
    loss(gates).backward()
    eps = 1e-5
    for layer, head in [(0, 1), (1, 2)]:
        step = torch.zeros(2, 4, dtype=torch.float64)
        step[layer, head] = eps
        with torch.no_grad():
            numeric = (loss(gates.detach() + step) - loss(gates.detach() - step)) / (2 * eps)
        assert float(gates.grad[layer, head]) == pytest.approx(float(numeric), rel=1e-5)
    assert gates.grad.abs().min() > 0


def test_cls_is_refused_without_a_class_token(siglip, eva02):
    """SigLIP's trunk has no class token (token 0 is a patch): ``cls`` is refused in one line, as on transformers'
    SigLIP; EVA's class token takes it."""
    from clipheads.errors import OperatorError

    assert not siglip.has_class_token and siglip.prefix_tokens == 0
    assert eva02.has_class_token and eva02.prefix_tokens == 1
    with pytest.raises(OperatorError, match="needs a class token") as err:
        clipheads.apply(siglip, clipheads.HeadMask.from_heads("L0.H0", siglip), op="cls")
    assert "\n" not in str(err.value) and siglip.hooked_layers == []
    with clipheads.ablate(eva02, clipheads.HeadMask.from_heads("L0.H0", eva02), op="cls"):
        assert eva02.hooked_layers == [0]


def test_fast_path_features_equal_the_plain_path(siglip, eva02):
    """The class-token tower (EVA02) reads the class token out; the attention-pooled one (SigLIP's
    AttentionPoolLatent reads every token) runs its last layer whole: both equal the plain ablated encode_image."""
    from clipheads.search import MaskEvaluator, Objective

    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    objective = Objective(lambda f: float(f.norm()), "norm")
    for backend in (eva02, siglip):
        evaluator = MaskEvaluator(backend, pixels, objective, batch_size=8)
        assert evaluator.fast_path
        masks = [clipheads.HeadMask.from_heads(h, backend) for h in ("L0.H1", "L1.H0,L1.H3")]
        for mask, features in zip(masks, evaluator.features_many(masks), strict=True):
            with torch.no_grad(), clipheads.ablate(backend, mask):
                expected = backend.encode_image(pixels)
            assert (features - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("config", ["ViT-B-16-SigLIP", "EVA01-g-14", "EVA02-E-14"])
@pytest.mark.parametrize("op", ["zero", "scale", "mean"])
def test_bake_equals_the_ablation(config, op, pixels):
    backend = tiny_timm_open_clip(config)
    mask = clipheads.HeadMask.from_heads(["L0.H1", "L1.H3"], backend)
    means = torch.randn(2, 4, 16) if op == "mean" else None
    with torch.no_grad():
        with clipheads.ablate(backend, mask, op=op, alpha=0.25, means=means):
            expected = backend.encode_image(pixels)
        baked = clipheads.bake(backend, mask, op=op, alpha=0.25, means=means)
        got = clipheads.load(baked).encode_image(pixels)
    assert type(baked.visual.trunk) is type(backend.model.visual.trunk) and not clipheads.load(baked).hooked_layers
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_bake_through_eva02_sub_ln_is_refused_in_one_line(eva02):
    mask = clipheads.HeadMask.from_heads("L0.H1", eva02)
    with pytest.raises(ClipHeadsError, match="sub-LN") as err:
        clipheads.bake(eva02, mask, op="zero")
    assert "\n" not in str(err.value)


def test_save_load_and_info(timm_backend, tmp_path, run_main, pixels):
    folder = clipheads.save(timm_backend, tmp_path / "saved")
    loaded = clipheads.load(folder)
    assert type(loaded).__name__ == "OpenCLIPTimmBackend"
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), timm_backend.encode_image(pixels))
    code, out, err = run_main("info", "--model", folder)
    assert code == 0, err
    assert "open_clip-timm" in out and "L1.H3" in out
    assert "heads in total" in out and " 8" in out


def test_unsupported_trunks_and_attention_are_refused_in_one_line(siglip):
    import copy

    from timm.layers import AttentionRope

    model = copy.deepcopy(siglip.model)
    model.visual.trunk.blocks[1].attn = AttentionRope(64, num_heads=4)
    with pytest.raises(ModelLoadError, match="block 1's attention is .*AttentionRope") as err:
        clipheads.load(model)
    assert "\n" not in str(err.value)
    model.visual.trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 8))
    with pytest.raises(ModelLoadError, match="not a timm VisionTransformer or Eva"):
        clipheads.load(model)


@pytest.mark.parametrize("config", ["ViT-B-16-SigLIP", "EVA02-B-16"])
def test_lora_on_the_attention_keeps_its_effect(config, pixels):
    """peft's LoRA on timm's qkv (SigLIP) or q_proj/v_proj (EVA02) and proj: a no-op ablation leaves the tuned
    output as is, and an identity ablation equals the identity ablation of the hand-merged model."""
    import copy

    peft = pytest.importorskip("peft")
    base = tiny_timm_open_clip(config)
    model = copy.deepcopy(base.model)
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=r".*visual\.trunk\.blocks\.\d+\.attn\.(qkv|q_proj|v_proj|proj)")
    peft_model = peft.get_peft_model(model, lora)
    tuned = peft_model.base_model.model
    backend = clipheads.load(tuned)
    mask = clipheads.HeadMask.from_heads(["L0.H1", "L1.H2"], backend)
    with torch.no_grad():
        out = backend.encode_image(pixels)
        assert (out - base.encode_image(pixels)).abs().max() > 1e-3 * out.abs().max()
        with clipheads.ablate(backend, mask, op="scale", alpha=1.0):
            assert torch.equal(backend.encode_image(pixels), out)
        with clipheads.ablate(backend, mask, op="identity"):
            tuned_identity = backend.encode_image(pixels)
        merged = clipheads.load(copy.deepcopy(peft_model).merge_and_unload())  # plain nn.Linear again
        assert type(merged.model.visual.trunk.blocks[0].attn.proj) is torch.nn.Linear
        with clipheads.ablate(merged, mask, op="identity"):
            merged_identity = merged.encode_image(pixels)
    assert (tuned_identity - merged_identity).abs().max() <= 1e-5 * out.abs().max()
    assert not backend.supports_layer_split  # adapters run inside timm's forward only


PLANTED = "L1.H2"


@pytest.mark.parametrize("config", CONFIGS)
def test_demo_size_search_finds_a_planted_head(config, tmp_path):
    """Single-head scan and a short AAT-GA on 8 images find the head whose proj columns were scaled up; AAT-BP
    trains the gates."""
    from clipheads.search import (
        BPConfig,
        GAConfig,
        MaskEvaluator,
        Objective,
        RunFolder,
        bp_search,
        ga_search,
        scan_heads,
    )

    backend = tiny_timm_open_clip(config)
    layer, head = clipheads.parse_head(PLANTED)
    with torch.no_grad():
        backend.model.visual.trunk.blocks[layer].attn.proj.weight[:, head * 16:(head + 1) * 16] *= 30.0
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), clipheads.ablate(backend, clipheads.HeadMask.from_heads(PLANTED, backend)):
        clean = backend.encode_image(pixels)
    target = F.normalize(clean, dim=-1)

    def match(features: torch.Tensor) -> float:  # 0 exactly when the features are the planted head's ablation
        return -float((F.normalize(features, dim=-1) - target).pow(2).sum(dim=-1).mean())

    evaluator = MaskEvaluator(backend, pixels, Objective(match, "match"), batch_size=16)
    scan = scan_heads(evaluator, RunFolder(tmp_path / "scan", {"strategy": "scan"}))
    assert scan.ranking()[0] == PLANTED
    result = ga_search(evaluator, GAConfig(beta=0.1, population=8, generations=3, seed=1),
                       RunFolder(tmp_path / "ga", {"strategy": "ga"}), scan=scan)
    assert PLANTED in result.mask.ablated and result.search_metric > result.search_baseline
    bp = bp_search(evaluator, target, torch.arange(8), BPConfig(beta=0.01, epochs=3, batch_size=4, lr=0.5))
    assert float(bp.gates.max() - bp.gates.min()) > 0  # the gates left their common start: BP's gradients arrive


@pytest.mark.parametrize("config", ["ViT-B-16-SigLIP", "EVA02-B-16"])
def test_cli_scan_and_ga_on_a_saved_tiny_model(config, tmp_path, run_main):
    """``clipheads scan`` and ``clipheads search --strategy ga`` on a saved tiny copy and 12 images with captions."""
    import json

    import numpy as np
    from PIL import Image

    model = clipheads.save(tiny_timm_open_clip(config), tmp_path / "model")
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "val" if i < 6 else "test", "imgid": i,
                       "sentences": [{"raw": f"a photo number {i}"}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"dataset": "toy", "images": images}))
    common = ["--model", model, "--data", tmp_path / "karpathy.json", "--batch-size", 16]
    code, out, err = run_main("scan", *common, "--out", tmp_path / "scan")
    assert code == 0, err
    assert len(json.loads((tmp_path / "scan" / "scan.json").read_text())["heads"]) == 8
    code, out, err = run_main("search", *common, "--strategy", "ga", "--population", 6, "--generations", 2,
                              "--out", tmp_path / "ga")
    assert code == 0, err
    assert clipheads.HeadMask.load(tmp_path / "ga" / "mask.json").shape == (2, 4)


@pytest.mark.parametrize("config", ["ViT-B-16-SigLIP", "EVA02-B-16"])
def test_cli_bake(config, tmp_path, run_main, pixels):
    """``clipheads bake`` folds a zero ablation of a SigLIP copy into a model that loads and equals the ablation; on
    EVA02 (sub-LN before proj) it is one ``error:`` line, exit 2, and nothing written."""
    backend = tiny_timm_open_clip(config)
    model = clipheads.save(backend, tmp_path / "model")
    mask = clipheads.HeadMask.from_heads("L0.H3,L1.H0", backend)
    mask_file = mask.save(tmp_path / "mask.json")
    code, out, err = run_main("bake", "--model", model, "--mask", mask_file, "--op", "zero", "--out", tmp_path / "o")
    if config == "EVA02-B-16":
        assert code == 2 and err.startswith("error: ") and "sub-LN" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
        return
    assert code == 0, err
    with torch.no_grad(), clipheads.ablate(backend, mask, op="zero"):
        expected = backend.encode_image(pixels)
    with torch.no_grad():
        got = clipheads.load(tmp_path / "o").encode_image(pixels)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
