"""Images on disk -> preprocessed pixel batches, through a ``torch.utils.data.DataLoader``.

A worker never raises on a bad image: it hands back the file and the reason, and the main process either stops with
one clear :class:`~clipheads.errors.DataError` line or, with ``skip_bad=True``, leaves the image out and counts it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clipheads.errors import DataError

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]

_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageRef:
    """An image that is not a file of its own (a member of a tar shard, a cell of a Hugging Face dataset).

    Subclasses are hashable and picklable (DataLoader workers get them), ``str()`` names the image for messages and
    caches, and :meth:`read_bytes` returns the encoded image (PNG/JPEG/... bytes).
    """

    def read_bytes(self) -> bytes:
        raise NotImplementedError

    def stat_key(self) -> tuple[int, int]:
        """``(size, modification time in ns)`` of what holds the image, for run keys and caches without reading the
        image (:class:`clipheads.runkey.ImagesKey`); ``(-1, -1)`` when unknown (the name alone then keys it)."""
        return -1, -1


ImageSource = Path | ImageRef


def as_source(item: str | Path | ImageRef) -> ImageSource:
    """A path or an :class:`ImageRef` as given; a string becomes a :class:`~pathlib.Path`."""
    return item if isinstance(item, ImageRef | Path) else Path(item)


def to_rgb(image: Image.Image) -> Image.Image:
    """The picture a viewer shows, as RGB: EXIF orientation applied, transparency composited on white, 16-bit and
    float greyscale scaled to 8 bits (as ``transformers.image_utils.load_image`` plus what it leaves out)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "RGBA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(source: str | Path | ImageRef) -> Image.Image:
    """Open and fully decode an image as the RGB picture a viewer shows (:func:`to_rgb`), or raise
    :class:`DataError` naming it. ``source`` is a file or an :class:`ImageRef`."""
    source = as_source(source)
    try:
        handle = io.BytesIO(source.read_bytes()) if isinstance(source, ImageRef) else source
        with Image.open(handle) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"image {str(source)!r} does not exist") from None
    except _READ_ERRORS as exc:
        raise DataError(f"cannot read image {str(source)!r} ({type(exc).__name__}: {exc})") from None


class ImageFiles(Dataset):
    """``dataset[i] -> (i, pixels [3, H, W] or None, error or None)`` over a list of image files."""

    def __init__(self, paths: Sequence[str | Path | ImageRef], transform: Transform) -> None:
        self.paths = [as_source(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(read_image(self.paths[index])), None
        except DataError as exc:
            return index, None, str(exc)
        except _READ_ERRORS as exc:  # raised by the transform on an image it cannot handle
            return index, None, f"cannot preprocess image {str(self.paths[index])!r} ({type(exc).__name__}: {exc})"


@dataclass
class PixelBatch:
    """Readable images of one loader batch: ``indices [B]`` into the file list and ``pixels [B, 3, H, W]``."""

    indices: torch.Tensor
    pixels: torch.Tensor | None
    errors: list[tuple[int, str]] = field(default_factory=list)  # (index, reason) of unreadable images


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> PixelBatch:
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    errors = [(i, error) for i, pixels, error in items if pixels is None]
    if not good:
        return PixelBatch(torch.empty(0, dtype=torch.long), None, errors)
    return PixelBatch(torch.tensor([i for i, _ in good]), torch.stack([p for _, p in good]), errors)


def image_loader(paths: Sequence[str | Path], transform: Transform, batch_size: int = 64,
                 num_workers: int = 0) -> DataLoader:
    """A DataLoader of :class:`PixelBatch` over ``paths`` in order (bad images are reported, not raised)."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    return DataLoader(ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers,
                      collate_fn=_collate, shuffle=False, persistent_workers=False)


def iter_pixels(loader: DataLoader, skip_bad: bool = False, skipped: list[str] | None = None,
                progress: bool = False) -> Iterator[PixelBatch]:
    """Batches with at least one readable image; a bad image raises :class:`DataError` unless ``skip_bad``.

    The images stream: the loader's workers read and preprocess one batch at a time (a few ahead), so no more than
    ``batch_size x (num_workers x prefetch + 1)`` decoded images exist at once, whatever the dataset's size. The
    paths of skipped images are appended to ``skipped``. ``progress`` shows a tqdm bar counting images, with their
    rate and the time left (ETA).
    """
    total = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    with tqdm(total=total, desc="images", unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            bar.update(len(batch.indices) + len(batch.errors))
            for index, reason in batch.errors:
                if not skip_bad:
                    raise DataError(f"{reason}; fix or remove it, or skip bad images (--skip-bad)")
                logger.warning("skipping %s", reason)
                if skipped is not None:
                    skipped.append(str(loader.dataset.paths[index]))
            if batch.pixels is not None:
                yield batch
