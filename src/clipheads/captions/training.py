"""Training a prefix captioner on image-caption pairs: frozen CLIP features cached once, then teacher forcing."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from clipheads.captions.prefix import PrefixCaptioner
from clipheads.errors import ClipHeadsError
from clipheads.eval.features import encode_pixel_batches

logger = logging.getLogger(__name__)


@dataclass
class CaptionTrainConfig:
    """Optimisation settings (AdamW, linear warm-up then linear decay to zero)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    max_caption_tokens: int | None = None
    seed: int = 0
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionTrainResult:
    """Losses of a training run: the mean per epoch and every step's."""

    epoch_losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    n_images: int = 0
    n_pairs: int = 0
    seconds: float = 0.0
    config: CaptionTrainConfig | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["config"] = self.config.to_dict() if self.config is not None else None
        return data


def encode_images(backend, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 64,
                  progress: bool = False) -> torch.Tensor:
    """CLIP image embeddings ``[N, D]`` (float32, CPU, not normalised) of ``[N, 3, H, W]`` pixels or an iterable of
    pixel batches: :func:`clipheads.eval.features.encode_pixel_batches`. Raises ClipHeadsError when empty."""
    return encode_pixel_batches(backend, images, batch_size, progress=progress)


def train_captioner(captioner: PrefixCaptioner, image_features: torch.Tensor, captions: Sequence[str],
                    image_index: Sequence[int] | None = None,
                    config: CaptionTrainConfig | None = None) -> CaptionTrainResult:
    """Train the captioner (prefix MLP and decoder) with teacher forcing on cached image features.

    Deterministic for a given ``config.seed`` on a given device.

    Args:
        captioner: the model to train, in place.
        image_features: ``[N, D]`` CLIP image embeddings (:func:`encode_images`).
        captions: the training captions, one per pair.
        image_index: for each caption, the row of its image in ``image_features`` (default: caption ``i`` belongs
            to image ``i``), so several captions can share an image.
        config: optimisation settings.
    """
    from transformers import get_linear_schedule_with_warmup

    config = config or CaptionTrainConfig()
    index = torch.arange(len(captions)) if image_index is None else torch.as_tensor(list(image_index))
    if len(captions) == 0:
        raise ClipHeadsError("no captions to train the captioner on")
    if len(index) != len(captions):
        raise ClipHeadsError(f"image_index has {len(index)} entries for {len(captions)} captions")
    if int(index.max()) >= len(image_features) or int(index.min()) < 0:
        raise ClipHeadsError(f"image_index points outside the {len(image_features)} image features")
    tokens = captioner.caption_tokens(captions, max_tokens=config.max_caption_tokens)
    steps_per_epoch = -(-len(captions) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    torch.manual_seed(config.seed)  # dropout
    generator = torch.Generator().manual_seed(config.seed)  # batch order
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), total_steps)
    result = CaptionTrainResult(n_images=len(image_features), n_pairs=len(captions), config=config)
    start = time.perf_counter()
    captioner.train()
    bar = tqdm(total=total_steps, desc="training captioner", unit="step", disable=not config.progress)
    for epoch in range(config.epochs):
        order = torch.randperm(len(captions), generator=generator)
        epoch_loss = 0.0
        for batch in order.split(config.batch_size):
            batch_tokens = tokens[batch]
            batch_tokens = batch_tokens[:, :int((batch_tokens >= 0).sum(1).max())]  # drop all-padding columns
            loss = captioner(image_features[index[batch]], batch_tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            result.step_losses.append(float(loss.detach()))
            epoch_loss += result.step_losses[-1] * len(batch)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{result.step_losses[-1]:.3f}")
        result.epoch_losses.append(epoch_loss / len(captions))
        logger.info("captioner epoch %d/%d: loss %.4f", epoch + 1, config.epochs, result.epoch_losses[-1])
    bar.close()
    captioner.eval()
    result.seconds = time.perf_counter() - start
    return result
