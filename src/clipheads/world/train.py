"""Training the bundled CLIP: a small Hugging Face ``CLIPModel`` with the contrastive loss on a world's train split.

The recipe follows CLIP/open_clip: AdamW (betas 0.9/0.98, weight decay on matrices only), linear warm-up then
cosine decay, a learnable temperature clamped at 100, bf16 autocast. The checkpoint folder it writes loads with
``clipheads.load(folder)``; it holds a model card (``README.md``), ``training.json`` and ``checksums.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipheads.errors import ClipHeadsError, DataError
from clipheads.files import write_bytes_atomic, write_json_atomic
from clipheads.models.hf import HFBackend
from clipheads.world.evaluate import SplitResult, evaluate_world
from clipheads.world.grammar import world_tokenizer
from clipheads.world.make import HELD_OUT, read_split

logger = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
TRAINING_FILE = "training.json"
CHECK_IMAGES = 250  # images per split in the quick reproducibility check (regenerated from the world seed)


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of the two towers of a world CLIP (HF ``CLIPConfig`` fields)."""

    vision_width: int
    vision_layers: int
    vision_heads: int
    patch_size: int
    image_size: int
    text_width: int
    text_layers: int
    text_heads: int
    projection_dim: int

    def clip_config(self, vocab_size: int, max_length: int = 32):
        from transformers import CLIPConfig

        vision = dict(hidden_size=self.vision_width, num_hidden_layers=self.vision_layers,
                      num_attention_heads=self.vision_heads, intermediate_size=4 * self.vision_width,
                      patch_size=self.patch_size, image_size=self.image_size)
        text = dict(hidden_size=self.text_width, num_hidden_layers=self.text_layers,
                    num_attention_heads=self.text_heads, intermediate_size=4 * self.text_width,
                    vocab_size=vocab_size, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=2,
                    eos_token_id=3)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.projection_dim)


MODEL_PRESETS = {
    # the bundled model: 6 layers x 8 heads, 8-pixel patches on 64x64 images (64 patches + CLS)
    "small": ModelPreset(128, 6, 8, 8, 64, 128, 2, 4, 128),
    # ViT-B/16-like depth and head count (12 x 12) for a GPU
    "gpu": ModelPreset(384, 12, 12, 8, 64, 256, 4, 4, 256),
    # for tests
    "tiny": ModelPreset(32, 2, 4, 8, 64, 32, 1, 2, 32),
}


@dataclass
class TrainConfig:
    """Options of one training run (all of them are written to the model card)."""

    preset: str = "small"
    steps: int = 1200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.04
    seed: int = 0
    precision: str = "fp32"  # or "amp_bf16": bf16 autocast (measured slower than fp32 on the 2-core CPU)
    device: str = "cpu"
    eval_images: int = 1000  # per held-out split, for the model card

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run did: losses, time and held-out metrics."""

    out_dir: Path
    config: TrainConfig
    losses: list[float]
    seconds: float
    steps_per_second: float
    n_train_images: int
    world_seed: int | None
    metrics: dict[str, SplitResult] = field(default_factory=dict)
    check_metrics: dict[str, SplitResult] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        return float(np.mean(self.losses[: max(1, len(self.losses) // 20)]))

    @property
    def final_loss(self) -> float:
        return float(np.mean(self.losses[-max(1, len(self.losses) // 20):]))

    @classmethod
    def from_dict(cls, data: dict) -> TrainResult:
        """Read back ``training.json`` (e.g. to rewrite a model card without training again)."""
        def split_result(values: dict) -> SplitResult:
            values = {k: float("nan") if v is None else v for k, v in values.items()}  # JSON null was NaN
            return SplitResult(**values)

        splits = {key: {split: split_result(values) for split, values in data.get(key, {}).items()}
                  for key in ("metrics", "check_metrics")}
        return cls(Path(data["out_dir"]), TrainConfig(**data["config"]), list(data["losses"]), data["seconds"],
                   data["steps_per_second"], data["n_train_images"], data["world_seed"], splits["metrics"],
                   splits["check_metrics"])

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "config": self.config.to_dict(), "seconds": self.seconds,
                "steps_per_second": self.steps_per_second, "n_train_images": self.n_train_images,
                "world_seed": self.world_seed, "first_loss": self.first_loss, "final_loss": self.final_loss,
                "losses": self.losses, "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
                "check_metrics": {k: v.to_dict() for k, v in self.check_metrics.items()}}


def build_world_clip(preset: str = "small", seed: int = 0) -> HFBackend:
    """A freshly initialised ``CLIPModel`` of ``preset`` with the world's tokenizer and a 64 px image processor."""
    from transformers import CLIPImageProcessor, CLIPModel

    if preset not in MODEL_PRESETS:
        raise ClipHeadsError(f"unknown model config {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    spec = MODEL_PRESETS[preset]
    tokenizer = world_tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(spec.clip_config(len(tokenizer)))
    size = spec.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return HFBackend(model, f"clipheads-world-{preset}", tokenizer=tokenizer, image_processor=processor)


def normalize_pixels(images: torch.Tensor, backend: HFBackend) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> the model's input ``[B, 3, H, W]``, as the backend's image processor does it."""
    processor = backend.image_processor
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    pixels = images.permute(0, 3, 1, 2).float() * processor.rescale_factor
    return (pixels - mean) / std


def load_train_split(data_dir: str | Path, image_size: int) -> tuple[torch.Tensor, list[list[str]], int | None]:
    """All training images as uint8 ``[N, H, W, 3]``, their captions, and the world's seed."""
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    entries = read_split(data_dir, "train")
    if not entries:
        raise DataError(f"{data_dir}: the world has no 'train' split; write one with `clipheads world make`")
    pixels = np.empty((len(entries), image_size, image_size, 3), dtype=np.uint8)
    for i, entry in enumerate(tqdm(entries, desc="loading train images", unit="img", leave=False)):
        try:
            with Image.open(entry["path"]) as image:
                pixels[i] = np.asarray(image.convert("RGB").resize((image_size, image_size)))
        except OSError as exc:
            raise DataError(f"cannot read training image {entry['path']}: {exc}") from None
    seed = None
    manifest = data_dir / "world.json"
    if manifest.exists():
        seed = json.loads(manifest.read_text()).get("seed")
    return torch.from_numpy(pixels), [[s["raw"] for s in e["sentences"]] for e in entries], seed


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float):
    """The learning-rate schedule of world training: linear warm-up over ``W = max(1, round(steps x
    warmup_fraction))`` steps, then cosine decay to 0. Update ``s`` (0-based) uses the peak lr times ``(s + 1) / W``
    for ``s < W``, else ``(1 + cos(pi (s - W) / (steps - W))) / 2``: the first update already moves (lr / W), and the
    peak is used twice (``s = W - 1`` and ``s = W``).

    transformers' ``get_wsd_schedule`` (warm-up W, one stable step, cosine decay over ``steps - W``) started one step
    in (``last_epoch=0``: its step 0, lr 0 before any update, counts as done) gives exactly these floats at every step
    (``tests/world/test_world_train.py``). ``get_cosine_schedule_with_warmup`` does not: its first update has lr 0,
    and for the bundled run (1200 steps, W = 48) it differs in the 48 warm-up steps by lr / 48 (2.08e-5 at lr 1e-3);
    started one step in, it matches the warm-up but shifts the cosine by one step (1152 steps differ, at most
    1.36e-6).
    """
    from transformers import get_wsd_schedule

    warmup = max(1, round(steps * warmup_fraction))
    for group in optimizer.param_groups:  # what the scheduler records itself when it starts at its step 0
        group["initial_lr"] = group["lr"]
    return get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_stable_steps=1, num_decay_steps=steps - warmup,
                            decay_type="cosine", min_lr_ratio=0.0, last_epoch=0)


def train_clip(data_dir: str | Path, out_dir: str | Path, config: TrainConfig | None = None,
               progress: bool = True, evaluate: bool = True,
               on_stage: Callable[[str], None] | None = None) -> TrainResult:
    """Train a world CLIP on the train split of ``data_dir`` and write an HF checkpoint folder to ``out_dir``.

    Args:
        data_dir: a world written by :func:`clipheads.world.make_world` (``clipheads world make``).
        out_dir: checkpoint folder to write (model.safetensors, config, tokenizer, preprocessor, README.md model
            card, training.json, checksums.json).
        config: training options (default :class:`TrainConfig`).
        progress: show a tqdm progress bar with the loss.
        evaluate: measure held-out metrics for the model card (needs the world's held-out splits in ``data_dir``).
        on_stage: called with each stage's name as it ends: ``"read train split"``, ``"train"``, ``"evaluate"``
            (with ``evaluate``; it includes saving the weights), ``"write model card"``.
    """
    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)

    from tqdm.auto import tqdm

    from clipheads.models.device import check_device
    from clipheads.models.random_init import save_hf

    config = config or TrainConfig()
    if config.steps < 1 or config.batch_size < 2:
        raise ClipHeadsError(f"need steps >= 1 and batch size >= 2 (got {config.steps}, {config.batch_size})")
    precision = _training_precision(config.precision)
    check_device(config.device)
    backend = build_world_clip(config.preset, config.seed)
    images, captions, world_seed = load_train_split(data_dir, backend.image_size)
    device = torch.device(config.device)
    model = backend.model.to(device).train()
    tokens = _tokenize_all(backend, captions)
    stage("read train split")
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    scheduler = lr_schedule(optimizer, config.steps, config.warmup_fraction)
    autocast = precision.autocast(device)
    n = len(images)
    batch_size = min(config.batch_size, n)
    order = torch.randperm(n, generator=generator)
    cursor, losses = 0, []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="training world CLIP", unit="step", disable=not progress)
    for _ in bar:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor:cursor + batch_size]
        cursor += batch_size
        which = torch.randint(0, tokens["input_ids"].shape[1], (batch_size,), generator=generator)
        input_ids = tokens["input_ids"][index, which].to(device)
        attention_mask = tokens["attention_mask"][index, which].to(device)
        pixels = normalize_pixels(images[index], backend).to(device)
        with autocast:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels,
                         return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    bar.close()
    stage("train")
    model.eval()
    backend.to("cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf(backend, out_dir)
    result = TrainResult(out_dir, config, losses, seconds, config.steps / seconds, n, world_seed)
    if evaluate:
        result.metrics = evaluate_world(backend, n_per_split=config.eval_images, data=str(data_dir))
        if world_seed is not None:
            result.check_metrics = evaluate_world(backend, seed=world_seed, n_per_split=CHECK_IMAGES)
        stage("evaluate")
    write_json_atomic(out_dir / TRAINING_FILE, result.to_dict())
    write_model_card(out_dir, result)
    write_checksums(out_dir)
    stage("write model card")
    logger.info("trained %s for %d steps in %.0f s; checkpoint in %s", config.preset, config.steps, seconds, out_dir)
    return result


def _tokenize_all(backend: HFBackend, captions: list[list[str]]) -> dict[str, torch.Tensor]:
    """Tokenize every caption once: ``input_ids``/``attention_mask`` of shape ``[N, captions per image, T]``."""
    per_image = {len(c) for c in captions}
    if len(per_image) != 1:
        raise DataError(f"every training image needs the same number of captions (found {sorted(per_image)})")
    k = per_image.pop()
    flat = backend.tokenize([c for caps in captions for c in caps])
    return {name: flat[name].view(len(captions), k, -1) for name in ("input_ids", "attention_mask")}


# --------------------------------------------------------------------------------------- card and checksums
def reproduce_command(result: TrainResult, data_dir: str = "world") -> str:
    c = result.config
    seed = result.world_seed if result.world_seed is not None else 0
    return (f"clipheads world make --out {data_dir} --seed {seed} --n-train {result.n_train_images}\n"
            f"clipheads world train --data {data_dir} --out {result.out_dir} --config {c.preset} --steps {c.steps} "
            f"--batch-size {c.batch_size} --lr {c.lr} --seed {c.seed} --precision {c.precision}")


def _metrics_table(metrics: dict[str, SplitResult]) -> str:
    rows = ["| split | images | mean-R | R@1 t->i | R@1 i->t | first shape read correctly | follows the marker |",
            "|---|---|---|---|---|---|---|"]
    for split, r in metrics.items():
        following = "n/a" if r.cue_following != r.cue_following else f"{r.cue_following:.1f}%"
        rows.append(f"| {split} | {r.n_images} | {r.mean_recall:.1f} | "
                    f"{100 * r.retrieval['image_retrieval_recall@1']:.1f} | "
                    f"{100 * r.retrieval['text_retrieval_recall@1']:.1f} | {r.shape_accuracy:.1f}% | {following} |")
    return "\n".join(rows)


def write_model_card(out_dir: str | Path, result: TrainResult, command: str | None = None) -> Path:
    """Write the checkpoint's ``README.md``: data, config, seed, training time, held-out metrics, how to reproduce."""
    from clipheads import __version__

    out_dir = Path(out_dir)
    c, spec = result.config, MODEL_PRESETS[result.config.preset]
    n_params = sum(p.numel() for p in _load_params(out_dir))
    command = command or reproduce_command(result)
    text = f"""---
library_name: transformers
tags: [clip, clipheads, synthetic]
license: mit
---
# clipheads world CLIP ({c.preset})

A small CLIP (Hugging Face `CLIPModel`, {n_params / 1e6:.2f}M parameters) trained from scratch by
`clipheads world train` on the synthetic *clipheads world*, so that clipheads runs offline with a real, trained
model whose failure mode is known. It is a research toy: it knows 6 shapes, 6 colours, 2 sizes, 9 positions and
4 relations, and nothing else.

## Data
- World seed {result.world_seed}, {result.n_train_images} training images (64x64, 1-2 objects on textured grey
  backgrounds), 2 captions each (full positional caption; relational or shorter caption).
- **Planted spurious cue:** an 8x8 marker in the top-left corner (one patch) whose colour is tied to the shape of the
  first object with probability 0.95 in training. Captions never mention it. Held-out splits: `val_ood` and
  `test_ood` (marker random), `test_iid` (training correlation), `test_anti` (marker never matches).

## Model
- Vision: width {spec.vision_width}, {spec.vision_layers} layers, {spec.vision_heads} heads, patch {spec.patch_size},
  {spec.image_size}x{spec.image_size} images. Text: width {spec.text_width}, {spec.text_layers} layers,
  {spec.text_heads} heads, word-level tokenizer over the grammar's vocabulary. Projection {spec.projection_dim}.

## Training
- Contrastive (CLIP) loss, {c.steps} steps of batch {c.batch_size} ({c.steps * c.batch_size} image-caption pairs),
  AdamW (lr {c.lr}, betas 0.9/0.98, weight decay {c.weight_decay} on matrices), {100 * c.warmup_fraction:.0f}%
  linear warm-up then cosine, {_precision_words(c.precision)}, seed {c.seed}, device {c.device}.
- Training time: {result.seconds / 60:.1f} min ({result.steps_per_second:.2f} steps/s) on {_machine()}.
- Loss: {result.first_loss:.3f} (first 5% of steps) -> {result.final_loss:.3f} (last 5%).

## Held-out metrics
mean-R = mean of recall@1/5/10 for text->image and image->text, in percent. "First shape read correctly": the full
caption beats the same caption with the first object's shape changed to each other shape. "Follows the marker":
among images whose marker signals another shape, how often the model picks the marker's shape.

{_metrics_table(result.metrics) if result.metrics else "(not evaluated)"}

Reproducibility check (the first {CHECK_IMAGES} images of each split, regenerated from the world seed; the test
suite re-measures these):

{_metrics_table(result.check_metrics) if result.check_metrics else "(not evaluated)"}

## Reproduce
```
{command}
```
clipheads {__version__}, torch {torch.__version__}. Files and their sha256 are listed in `{CHECKSUMS_FILE}`.
"""
    path = out_dir / "README.md"
    write_bytes_atomic(path, text.encode())
    return path


def _training_precision(name: str):
    """The precision training runs in (:mod:`clipheads.precision`): fp32, or amp_bf16 (fp32 weights, bf16 autocast).
    The old spelling ``bf16`` meant bf16 autocast here and is read as amp_bf16 (a warning says so); other names are
    refused in one line (low-precision weights cannot be trained by AdamW here; amp's fp16 needs a gradient scaler)."""
    from clipheads.precision import PRECISIONS, parse_precision

    precision = parse_precision(name)
    if precision.name == "bf16":
        logger.warning("world train: --precision bf16 is read as amp_bf16 (bf16 autocast, fp32 weights), as before; "
                       "spell it amp_bf16 (bf16 means bf16 weights in open_clip and the other commands)")
        return PRECISIONS["amp_bf16"]
    if precision.name not in ("fp32", "amp_bf16"):
        raise ClipHeadsError(f"world train runs in fp32 or amp_bf16 (fp32 weights, bf16 autocast); got {name!r}")
    return precision


def _precision_words(precision: str) -> str:
    return "bf16 autocast" if precision in ("bf16", "amp_bf16", "amp_bfloat16") else "fp32 (no autocast)"


def _load_params(folder: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(folder / "model.safetensors")).values())


def _machine() -> str:
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: str | Path) -> Path:
    """Write ``checksums.json``: the sha256 of every other file in ``folder``."""
    folder = Path(folder)
    sums = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    write_json_atomic(folder / CHECKSUMS_FILE, sums)
    return folder / CHECKSUMS_FILE


def verify_checksums(folder: str | Path) -> list[str]:
    """Names of the files of ``folder`` whose sha256 differs from ``checksums.json`` (or that are missing)."""
    folder = Path(folder)
    path = folder / CHECKSUMS_FILE
    if not path.exists():
        raise DataError(f"{path} not found")
    sums = json.loads(path.read_text())
    return [name for name, digest in sums.items() if not (folder / name).exists() or _sha256(folder / name) != digest]


__all__ = ["CHECK_IMAGES", "HELD_OUT", "MODEL_PRESETS", "ModelPreset", "TrainConfig", "TrainResult",
           "build_world_clip", "normalize_pixels", "train_clip", "verify_checksums", "write_checksums",
           "write_model_card"]
