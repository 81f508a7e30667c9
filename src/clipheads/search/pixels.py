"""The search split's preprocessed images under a memory budget: as floats, as exact uint8 codes, or re-read.

A search keeps its split's pixels ``[N, 3, H, W]`` for the cache build, the head means and the attribution scan. A
:class:`PixelStore` holds them one of three ways (``storage``), all giving the same float tensors to the last bit:

* ``float32``: the preprocessed floats (4 bytes a value), as :func:`~clipheads.search.tasks.load_pixels` returns;
* ``uint8``: one byte a value. Every model's preprocessing ends with a per-channel map of the resized 8-bit image
  (``ToTensor`` + ``Normalize`` in open_clip, rescale + normalise in a transformers image processor), so each float
  is ``table[channel, code]`` for a code 0..255. The table is read off the model's own preprocessing of a picture
  that holds every code in every channel at the model's input size (no resampling), and every stored batch is
  checked: ``table[codes]`` must equal the preprocessed floats bit for bit, else the store keeps floats;
* ``disk``: nothing kept; each request reads and preprocesses its images again (the model's transform is
  deterministic: the same floats).

:func:`~clipheads.search.memory.plan_pixels` chooses the storage from the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipheads.data import image_loader, iter_pixels
from clipheads.errors import DataError
from clipheads.models import CLIPBackend

log = logging.getLogger(__name__)

STORAGES = ("float32", "uint8", "disk")


def code_table(backend: CLIPBackend) -> torch.Tensor | None:
    """``[3, 256]`` float32: the model's preprocessed value of each 8-bit code per channel, or ``None`` when its
    preprocessing is not a per-channel map of 8-bit codes (then pixels cannot be stored as ``uint8`` exactly).

    Read off ``backend.preprocess`` of an ``S x S`` picture (``S``: the model's input size, so nothing is resampled)
    whose pixel ``(y, x)`` holds code ``(y * (S + 1) + x + 85 c) % 256`` in channel ``c`` (each code at several
    rows and columns: a value that depends on the position shows as a code with two values).
    """
    size = int(backend.image_size)
    if size * size < 256:
        return None
    grid = np.arange(size).reshape(-1, 1) * (size + 1) + np.arange(size)
    codes = (grid[:, :, None] + np.array([0, 85, 170])) % 256
    try:
        out = backend.preprocess(Image.fromarray(codes.astype(np.uint8), "RGB"))
    except Exception as exc:  # noqa: BLE001 - any failure only means: keep floats
        log.info("no uint8 code table (%s: %s)", type(exc).__name__, exc)
        return None
    if not isinstance(out, torch.Tensor) or out.shape != (3, size, size) or out.dtype != torch.float32:
        return None
    index = torch.from_numpy(codes).permute(2, 0, 1).long()  # [3, S, S]
    table = torch.zeros(3, 256, dtype=torch.float32)
    table.scatter_(1, index.reshape(3, -1), out.reshape(3, -1))
    if not torch.equal(table.gather(1, index.reshape(3, -1)), out.reshape(3, -1)):
        return None  # a code that maps to two values: not a per-channel map
    return table


def encode_codes(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """``[B, 3, H, W]`` uint8 codes whose ``table`` values are ``pixels`` bit for bit, or ``None`` if there are none."""
    codes = torch.empty(pixels.shape, dtype=torch.uint8)
    for c in range(3):
        order = table[c].argsort()
        position = torch.searchsorted(table[c][order].contiguous(), pixels[:, c].contiguous()).clamp(max=255)
        codes[:, c] = order[position].to(torch.uint8)
    return codes if torch.equal(decode_codes(codes, table), pixels) else None


def decode_codes(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` float32 pixels of uint8 ``codes`` (a lookup: the stored floats exactly)."""
    flat = codes.reshape(codes.shape[0], 3, -1).long()
    return table.unsqueeze(0).expand(codes.shape[0], -1, -1).gather(2, flat).view(codes.shape)


class PixelStore:
    """``N`` preprocessed images ``[N, 3, H, W]`` (float32), kept as ``storage`` says (see the module).

    Indexing with a slice or an int returns float32 pixels (``[b, 3, H, W]`` / ``[3, H, W]``) equal to the
    preprocessed ones to the last bit; :meth:`split` iterates over batches. ``nbytes`` is what the store holds.
    """

    def __init__(self, storage: str, shape: tuple[int, ...], *, floats: torch.Tensor | None = None,
                 codes: torch.Tensor | None = None, table: torch.Tensor | None = None,
                 paths: Sequence[Path] | None = None, backend: CLIPBackend | None = None, batch_size: int = 64,
                 num_workers: int = 0) -> None:
        self.storage = storage
        self.shape = torch.Size(shape)
        self.dtype = torch.float32
        self._floats, self._codes, self._table = floats, codes, table
        self._paths = list(paths or [])
        self._backend, self._batch_size, self._num_workers = backend, batch_size, num_workers

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def nbytes(self) -> int:
        if self.storage == "float32":
            return self._floats.numel() * self._floats.element_size()
        if self.storage == "uint8":
            return self._codes.numel() + self._table.numel() * 4
        return 0

    def describe(self) -> str:
        """e.g. ``pixels uint8 exact codes (12 MiB)``."""
        from clipheads.search.memory import format_size

        if self.storage == "disk":
            return "pixels re-read from disk per batch"
        return f"pixels {'uint8 exact codes' if self.storage == 'uint8' else 'float32'} ({format_size(self.nbytes)})"

    def subset(self, rows: slice) -> PixelStore:
        """The store of ``rows`` only, kept the same way (nothing decoded): a torchrun rank's share of the images."""
        start, stop, _ = rows.indices(len(self))
        return PixelStore(self.storage, (max(0, stop - start), *self.shape[1:]),
                          floats=None if self._floats is None else self._floats[rows],
                          codes=None if self._codes is None else self._codes[rows], table=self._table,
                          paths=self._paths[rows], backend=self._backend, batch_size=self._batch_size,
                          num_workers=self._num_workers)

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        if isinstance(index, int):
            index = range(len(self))[index]  # IndexError past the end, as a tensor
            return self[index:index + 1][0]
        if self.storage == "float32":
            return self._floats[index]
        if self.storage == "uint8":
            return decode_codes(self._codes[index], self._table)
        paths = self._paths[index]
        if not paths:
            return torch.empty(0, *self.shape[1:])
        chunks = [batch.pixels for batch in iter_pixels(image_loader(paths, self._backend.preprocess,
                                                                     self._batch_size, self._num_workers))]
        return torch.cat(chunks)

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Float32 batches of ``size`` images (the last may be smaller), as ``torch.Tensor.split`` gives them."""
        for i in range(0, len(self), size):
            yield self[i:i + size]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def head(self, n: int) -> PixelStore:
        """The first ``n`` images, kept the same way (no copy of codes or floats)."""
        n = min(n, len(self))
        shape = (n, *self.shape[1:])
        return PixelStore(self.storage, shape, floats=None if self._floats is None else self._floats[:n],
                          codes=None if self._codes is None else self._codes[:n], table=self._table,
                          paths=self._paths[:n], backend=self._backend, batch_size=self._batch_size,
                          num_workers=self._num_workers)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return 4

    def float(self) -> torch.Tensor:
        """All pixels as one float32 tensor (the all-in-memory form)."""
        return self[0:len(self)]


def load_pixel_store(backend: CLIPBackend, paths: list[Path], storage: str = "float32", batch_size: int = 64,
                     num_workers: int = 0, skip_bad: bool = False, progress: bool = False
                     ) -> tuple[PixelStore, torch.Tensor, list[str]]:
    """Read and preprocess ``paths`` once into a :class:`PixelStore`; returns it, the positions of the kept images
    ``[N_kept]`` and the skipped files. ``uint8`` falls back to ``float32`` when the model's preprocessing is not a
    per-channel map of 8-bit codes (logged); ``disk`` keeps the readable paths and reads them again on request.

    Raises:
        DataError: no image could be read, a bad image without ``skip_bad``, or an unknown ``storage``.
    """
    if storage not in STORAGES:
        raise DataError(f"pixel storage must be one of {', '.join(STORAGES)}; got {storage!r}")
    table = code_table(backend) if storage == "uint8" else None
    if storage == "uint8" and table is None:
        log.warning("%s: its preprocessing is not a per-channel map of 8-bit codes; pixels kept as float32",
                    backend.name)
        storage = "float32"
    skipped: list[str] = []
    chunks, kept = [], []
    for batch in iter_pixels(image_loader(paths, backend.preprocess, batch_size, num_workers), skip_bad, skipped,
                             progress):
        kept.append(batch.indices)
        if storage == "uint8":
            codes = encode_codes(batch.pixels, table)
            if codes is None:  # not exact: the floats so far, and floats from here on
                log.warning("pixels of %s are not exact 8-bit codes; kept as float32", paths[int(batch.indices[0])])
                chunks = [decode_codes(c, table) for c in chunks]
                storage = "float32"
            else:
                chunks.append(codes)
                continue
        if storage == "float32":
            chunks.append(batch.pixels)
        else:
            shape = batch.pixels.shape[1:]
    if not kept:
        raise DataError(f"none of the {len(paths)} images could be read (first: {str(paths[0])!r})")
    kept_index = torch.cat(kept)
    n = len(kept_index)
    if storage == "disk":
        store = PixelStore("disk", (n, *shape), paths=[paths[i] for i in kept_index.tolist()], backend=backend,
                           batch_size=batch_size, num_workers=num_workers)
    elif storage == "uint8":
        codes = torch.cat(chunks)
        store = PixelStore("uint8", tuple(codes.shape), codes=codes, table=table)
    else:
        floats = torch.cat(chunks)
        store = PixelStore("float32", tuple(floats.shape), floats=floats)
    return store, kept_index, skipped


__all__ = ["STORAGES", "PixelStore", "code_table", "decode_codes", "encode_codes", "load_pixel_store"]
