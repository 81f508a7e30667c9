"""Fine-tuning baselines for AAT: full fine-tuning of the image encoder, and PEFT methods (LoRA, IA3) via ``peft``.

Every method trains on the same image-text pairs as the AAT search, with the CLIP contrastive loss against cached
text features (the text tower stays frozen, as in AAT-BP), validates after every epoch and reports its number of
trainable parameters, so that AAT (one bit per head) can be compared on parameter efficiency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from clipheads.errors import ClipHeadsError
from clipheads.metrics.retrieval import captions_by_image, check_text_to_image, clip_loss
from clipheads.models import CLIPBackend

log = logging.getLogger(__name__)

METHODS = ("full", "lora", "ia3")


@dataclass
class FinetuneConfig:
    """How to fine-tune. ``lr`` defaults per method (full: 1e-5, lora/ia3: 1e-3) when left at ``None``."""

    method: str = "lora"
    rank: int = 8
    lora_alpha: int = 16
    epochs: int = 3
    batch_size: int = 64  # pairs per step; every pair is used each epoch, the last batch may be smaller
    lr: float | None = None
    weight_decay: float = 0.1
    seed: int = 0

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.method == "full" else 1e-3)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_metric: float
    seconds: float


@dataclass
class FinetuneResult:
    method: str
    config: dict
    trainable_params: int
    total_params: int
    history: list[EpochRecord] = field(default_factory=list)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


contrastive_loss = clip_loss  # the one CLIP loss (open_clip's ClipLoss), under its earlier name here


def require_peft(methods) -> None:
    """Refuse (one line, before any work) when one of ``methods`` (lora, lora-rN, ia3) needs ``peft`` and it cannot
    be imported (a dependency of clipheads, but an environment can lack it)."""
    needing = [m for m in methods if m.startswith("lora") or m == "ia3"]
    if not needing:
        return
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise ClipHeadsError(f"{', '.join(needing)} need(s) the peft library, which cannot be imported "
                             f"({type(exc).__name__}); install it: pip install peft") from None


def _peft_config(backend: CLIPBackend, config: FinetuneConfig):
    """peft's config for ``lora``/``ia3`` on the image tower, targeting only weights that change the output.

    transformers: LoRA on ``q_proj``/``k_proj``/``v_proj``/``out_proj``; IA3 on the same plus ``mlp.fc2``.
    open_clip (``nn.MultiheadAttention``): LoRA on the packed q/k/v weight ``in_proj_weight`` through peft's
    ``target_parameters`` (the weight is parametrized as ``W + scaling * B @ A`` while the module runs, exactly LoRA).
    Not its ``out_proj``: the module never calls ``out_proj.forward`` (a LoRA there would not run), and peft's
    ``nn.MultiheadAttention`` support (0.21.2) applies an out_proj update twice (``W + 2 dW``). IA3: the MLP's
    ``c_proj`` input only (IA3 on ``attn.out_proj`` would never run, and q/k/v are one packed parameter).
    """
    from peft import IA3Config, LoraConfig

    if backend.kind == "hf":
        attn = r".*vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
        mlp = r".*vision_model\.encoder\.layers\.\d+\.mlp\.fc2"
        if config.method == "lora":
            return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=attn, lora_dropout=0.0)
        return IA3Config(target_modules=f"({attn}|{mlp})", feedforward_modules=mlp)
    if config.method == "lora":
        if "target_parameters" not in LoraConfig.__dataclass_fields__:
            raise ClipHeadsError("LoRA on an open_clip image tower needs peft >= 0.17 (LoraConfig.target_parameters); "
                                 "pip install -U peft")
        names = [f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(backend.n_layers)]
        return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=[], target_parameters=names,
                          lora_dropout=0.0)
    mlp = r"visual\.transformer\.resblocks\.\d+\.mlp\.c_proj"
    return IA3Config(target_modules=mlp, feedforward_modules=mlp)


def prepare_model(backend: CLIPBackend, config: FinetuneConfig) -> tuple[nn.Module, int, int]:
    """Return the model to train (a peft model for lora/ia3), its number of trainable and of total parameters.

    Only parameters that change the image embedding are trained and counted (see :func:`_peft_config`)."""
    if config.method not in METHODS:
        raise ClipHeadsError(f"unknown fine-tuning method {config.method!r}; choose one of {', '.join(METHODS)}")
    model = backend.model
    for p in model.parameters():
        p.requires_grad_(False)
    if config.method == "full":
        tower = model.vision_model if backend.kind == "hf" else model.visual
        for p in tower.parameters():
            p.requires_grad_(True)
        if hasattr(model, "visual_projection"):  # SigLIP has none: its attention-pooling head is in the tower
            model.visual_projection.weight.requires_grad_(True)
        trained = model
    else:
        require_peft([config.method])
        from peft import get_peft_model

        trained = get_peft_model(model, _peft_config(backend, config))
    n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trained.parameters())
    return trained, n_trainable, n_total


def finetune(
    backend: CLIPBackend,
    pixels: torch.Tensor,
    text_features: torch.Tensor,
    config: FinetuneConfig,
    validate: Callable[[CLIPBackend], float] | None = None,
    out_dir: str | Path | None = None,
    text_to_image: torch.Tensor | None = None,
) -> tuple[CLIPBackend, FinetuneResult]:
    """Fine-tune the image encoder on matched pairs ``pixels [N, 3, H, W]`` / ``text_features [N, D]``.

    With ``text_to_image`` (``[N_txt]``, the image of each of ``text_features [N_txt, D]``), images may have several
    captions: every epoch passes once over the images, each with one of its captions drawn at random (as AAT-BP).

    ``backend.model`` is trained in place (load a fresh model for each run). ``validate(backend) -> float`` is
    called after every epoch (e.g. held-out mean-R). With ``out_dir`` the final weights are saved with the
    libraries' own functions (peft adapters via ``save_pretrained``; full HF models via ``save_pretrained``;
    open_clip via ``torch.save(state_dict)``). Returns the backend (now running the tuned model) and the result.
    """
    captions_of = _captions_of(len(pixels), text_features, text_to_image)
    images = torch.tensor([i for i, caps in enumerate(captions_of) if caps], dtype=torch.long)
    if len(images) < 2:
        raise ClipHeadsError(f"fine-tuning needs at least 2 matched pairs (got {len(pixels)} images and "
                             f"{len(text_features)} texts)")
    torch.manual_seed(config.seed)
    # peft injects its adapters into backend.model in place, so the backend itself now runs the tuned model
    trained, n_trainable, n_total = prepare_model(backend, config)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate(), weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(images) // config.batch_size)  # every pair every epoch, as AAT-BP and the captioner
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * config.epochs)
    logit_scale = backend.logit_scale
    text_features = text_features.to(backend.device)
    result = FinetuneResult(config.method, asdict(config), n_trainable, n_total)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        trained.train()
        order = images[torch.randperm(len(images), generator=generator)]
        picks = torch.tensor([captions_of[i][int(torch.randint(len(captions_of[i]), (1,), generator=generator))]
                              if len(captions_of[i]) > 1 else captions_of[i][0] for i in order.tolist()])
        losses = []
        for step in tqdm(range(steps_per_epoch), desc=f"{config.method} epoch {epoch}", leave=False):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            texts = picks[step * config.batch_size:(step + 1) * config.batch_size]
            loss = contrastive_loss(backend.encode_image(pixels[idx]), text_features[texts], logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        trained.eval()
        val = float(validate(backend)) if validate is not None else float("nan")
        result.history.append(EpochRecord(epoch, sum(losses) / len(losses), val, time.perf_counter() - epoch_start))
        log.info("%s epoch %d: loss %.4f, val %.3f", config.method, epoch, result.history[-1].train_loss, val)
    result.wall_seconds = time.perf_counter() - start
    if out_dir is not None:
        save_finetuned(trained, backend, Path(out_dir))
    return backend, result


def _captions_of(n_images: int, text_features: torch.Tensor, text_to_image: torch.Tensor | None) -> list[list[int]]:
    """Caption indices of every image: row ``i`` of ``text_features`` for image ``i`` without ``text_to_image``."""
    if text_to_image is None:
        if n_images != len(text_features):
            raise ClipHeadsError(f"fine-tuning needs matched pairs (got {n_images} images and {len(text_features)} "
                                 "texts; pass text_to_image when images have several captions)")
        return [[i] for i in range(n_images)]
    return captions_by_image(check_text_to_image(text_to_image, len(text_features), n_images), n_images)


def save_finetuned(trained: nn.Module, backend: CLIPBackend, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(trained, "peft_config") or backend.kind == "hf":
        trained.save_pretrained(out_dir)  # peft: adapter weights + adapter_config.json; HF: the whole model
    else:
        torch.save(trained.state_dict(), out_dir / "open_clip_model.pt")
    return out_dir
