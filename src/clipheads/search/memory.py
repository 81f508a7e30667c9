"""A memory budget for the search's cache: how much of the residual stream to keep, where, and how many rows to run.

The :class:`~clipheads.search.MaskEvaluator` keeps the residual stream entering cached layers for every search image
(``[N, T, W]`` per cached layer) and runs masks over chunks of those images. :func:`plan_cache` chooses, in this
order, the first plan whose estimate fits the budget:

1. every layer cached, in the model's dtype, where the model runs, image chunks of ``batch_size`` rows;
2. every ``k``-th layer only (``k`` = 2, 3, ... up to one cached layer, the one entering layer 0): a mask whose first
   ablated layer is not cached recomputes the unablated layers from the nearest cached one before it;
3. fewer rows per forward (image chunks, halved until one forward fits next to one cached layer; the features of
   the chunks are concatenated), with as many cached layers as then fit;
4. on CUDA only: the cache in the host's (pinned) memory, streamed to the GPU one chunk at a time, checked against
   the host's available memory.

None of these changes a score: the same arithmetic runs on the same values (tested to the last bit on tiny models).
A lower-precision cache (``cache_dtype``) is never chosen by the planner, only when asked for.

Estimates (bytes): cache = ``N x cached layers x T x W x cache itemsize``; one forward of ``r`` rows =
``r x T x (10 W + 2 H T) x model itemsize`` (q, k, v, MLP hidden and the attention matrix of one layer). What is not
counted: the model's weights, the text features, the image features ``[N, D]`` of the masks of one forward, and the
caller's decoded pixels (pass their size as ``other_bytes`` when they share the budget).

The same budget plans what else the commands hold: :func:`plan_pixels` (the search split's pixels as float32, exact
uint8 codes or re-read from disk, :mod:`clipheads.search.pixels`), :func:`plan_explain` (the head contributions of
``describe``/``ccs`` in memory or streamed as second moments), and in their own modules the attribution scan's
batches (:func:`clipheads.search.attribution.attribution_rows`) and AAT-BP's activation checkpointing
(:func:`clipheads.search.bp.plan_checkpointing`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

import torch

from clipheads.errors import ClipHeadsError

log = logging.getLogger(__name__)

HEADROOM = 0.8  # the default budget: this fraction of the memory free now
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_MiB = 1024 ** 2


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``512MiB``, ``8GiB``, ``2GB``, ``1.5G`` or ``1000000`` (GB = 10^9, GiB = 2^30).

    Raises:
        ClipHeadsError: not a positive size with a known unit.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ClipHeadsError(f"not a memory size: {text!r}; write e.g. 512MiB, 8GiB or 2GB")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ClipHeadsError(f"a memory budget must be positive; got {text!r}")
    return size


def format_size(size: int) -> str:
    """``1536 MiB``-style text (GiB from 10 GiB up, KiB under 1 MiB)."""
    if size < _MiB:
        return f"{size / 1024:.0f} KiB"
    return f"{size / 1024 ** 3:.1f} GiB" if size >= 10 * 1024 ** 3 else f"{size / _MiB:.0f} MiB"


def host_available() -> int:
    """Bytes of host memory available now: psutil's ``available`` if installed, else ``MemAvailable`` of
    /proc/meminfo.

    Raises:
        ClipHeadsError: neither can be read (pass an explicit budget).
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ClipHeadsError("cannot tell the free host memory (no psutil, no /proc/meminfo); pass --memory-budget")


def default_budget(device: str | torch.device) -> int:
    """``HEADROOM`` x the memory free now where the cache lives: ``torch.cuda.mem_get_info`` on a CUDA device, the
    host's available memory otherwise."""
    device = torch.device(device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_available()
    return int(free * HEADROOM)


def forward_bytes(rows: int, tokens: int, width: int, heads: int, itemsize: int) -> int:
    """Estimated working memory of one layer's forward over ``rows`` rows of ``tokens x width`` (no autograd)."""
    return rows * tokens * (10 * width + 2 * heads * tokens) * itemsize


@dataclass(frozen=True)
class CachePlan:
    """How the search keeps its cache.

    Attributes:
        cache_stride: the residual entering every ``cache_stride``-th layer is kept (1: every layer).
        n_cached: cached layers (``ceil(n_layers / cache_stride)``).
        cache_dtype: ``"float32"``, ``"bfloat16"``... of the cached residuals (default the model's).
        location: ``"device"`` (where the model runs) or ``"host"`` (CPU memory, pinned on CUDA, streamed per chunk).
        rows: most rows (images x stacked masks) per forward: the image chunk of one mask.
        cache_bytes: bytes of the cache (``N x n_cached x T x W x itemsize``).
        forward_bytes: estimated bytes of one forward of ``rows`` rows.
        budget_bytes: the budget planned for (``None``: no budget, everything kept).
    """

    cache_stride: int
    n_cached: int
    cache_dtype: str
    location: str
    rows: int
    cache_bytes: int
    forward_bytes: int
    budget_bytes: int | None = None

    def describe(self) -> str:
        """One line, e.g. ``cache 12/12 layers float32 on device (222 MiB), 64 rows per forward, budget 8 GiB``."""
        where = "on device" if self.location == "device" else "on host, streamed"
        budget = "no budget" if self.budget_bytes is None else f"budget {format_size(self.budget_bytes)}"
        return (f"cache {self.n_cached} layer{'s' if self.n_cached != 1 else ''} (every {self.cache_stride}) "
                f"{self.cache_dtype} {where} ({format_size(self.cache_bytes)}), {self.rows} rows per forward, "
                f"{budget}")

    def short(self) -> str:
        """A compact label for tables: ``stride1/float32/device/rows64``."""
        return f"stride{self.cache_stride}/{self.cache_dtype}/{self.location}/rows{self.rows}"

    def to_dict(self) -> dict:
        return {**asdict(self), "description": self.describe()}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.cache_dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_cache(*, n_images: int, n_layers: int, n_heads: int, tokens: int, width: int, model_dtype: torch.dtype,
               batch_size: int, budget: int | None, device: str | torch.device = "cpu",
               cache_dtype: torch.dtype | None = None, cache_stride: int | None = None, other_bytes: int = 0,
               host_budget: int | None = None) -> CachePlan:
    """The first plan (see the module's order) whose cache + one forward (+ ``other_bytes``) fit ``budget`` bytes.

    Args:
        n_images, n_layers, n_heads: ``N``, ``L``, ``H``; tokens, width: ``T``, ``W`` of the residual stream.
        batch_size: the most rows per forward asked for.
        budget: bytes; ``None``: no planning (every ``cache_stride``-th layer, default 1, on device, ``batch_size``
            rows), the all-in-memory path.
        device: where the model runs. cache_dtype: the cache's dtype (default ``model_dtype``).
        cache_stride: a fixed stride (the planner then only chooses rows and location).
        host_budget: bytes of host memory for a host cache on CUDA (default :func:`default_budget` of the CPU).

    Raises:
        ClipHeadsError: the budget does not hold one cached layer and one forward of one image.
    """
    device = torch.device(device)
    cache_dtype = cache_dtype or model_dtype
    cache_item = torch.empty((), dtype=cache_dtype).element_size()
    model_item = torch.empty((), dtype=model_dtype).element_size()
    per_layer = n_images * tokens * width * cache_item
    batch_size = max(1, int(batch_size))

    def plan(stride: int, location: str, rows: int) -> CachePlan:
        n_cached = len(range(0, n_layers, stride))
        return CachePlan(stride, n_cached, _dtype_name(cache_dtype), location, rows, n_cached * per_layer,
                         forward_bytes(rows, tokens, width, n_heads, model_item), budget)

    if budget is None:
        return plan(max(1, cache_stride or 1), "device", batch_size)
    strides = [cache_stride] if cache_stride else [s for s in range(1, n_layers + 1)
                                                   if s == 1 or len(range(0, n_layers, s)) < len(range(0, n_layers,
                                                                                                          s - 1))]
    full_rows = batch_size

    def rows_that_fit(free: int) -> int:
        rows = full_rows
        while rows >= 1 and forward_bytes(rows, tokens, width, n_heads, model_item) > free:
            rows //= 2
        return rows

    available = budget - other_bytes
    for stride in strides:  # 1. and 2.: full rows, fewer cached layers
        candidate = plan(stride, "device", full_rows)
        if candidate.cache_bytes + candidate.forward_bytes <= available:
            return candidate
    last = plan(strides[-1], "device", 1)
    rows = rows_that_fit(available - last.cache_bytes)  # 3.: image chunks, then as many cached layers as fit
    for stride in strides if rows >= 1 else []:
        candidate = plan(stride, "device", rows)
        if candidate.cache_bytes + candidate.forward_bytes <= available:
            return candidate
    if device.type == "cuda":  # 4.: the cache on the host, one chunk at a time on the GPU
        host = default_budget("cpu") if host_budget is None else host_budget
        rows = rows_that_fit(available // 2)  # the chunk being streamed in and the forward
        for stride in strides:
            candidate = plan(stride, "host", max(rows, 1))
            if rows >= 1 and candidate.cache_bytes <= host - other_bytes:
                return candidate
    need = last.cache_bytes + last.forward_bytes + other_bytes
    raise ClipHeadsError(f"memory budget {format_size(budget)} is too small for {n_images} images: one cached layer "
                         f"({format_size(last.cache_bytes)}) and a forward of one image "
                         f"({format_size(last.forward_bytes)}) need {format_size(need)}")


@dataclass(frozen=True)
class ExplainPlan:
    """How the head explanations (decomposition, TextSpan) hold the ``[N, S, H, D]`` head contributions.

    Attributes:
        streamed: ``False``: every image's contributions in memory (the all-in-memory path); ``True``: image chunks
            folded into the heads' uncentred second moments (``[G, D, D]`` float64) and dropped.
        n_images, chunk: images, and images per decomposed chunk.
        held_bytes: estimated bytes held: all contributions and one chunk's work, or the moments and one chunk's.
        budget_bytes: the budget planned for (``None``: no budget).
    """

    streamed: bool
    n_images: int
    chunk: int
    held_bytes: int
    budget_bytes: int | None = None

    def describe(self) -> str:
        """One line, e.g. ``head contributions streamed in chunks of 32 images (second moments) (3 MiB), budget
        1024 MiB``."""
        budget = "no budget" if self.budget_bytes is None else f"budget {format_size(self.budget_bytes)}"
        how = (f"streamed in chunks of {self.chunk} images (second moments)" if self.streamed
               else f"of {self.n_images} images in memory")
        return f"head contributions {how} ({format_size(self.held_bytes)}), {budget}"

    def to_dict(self) -> dict:
        return {**asdict(self), "description": self.describe()}


def plan_explain(*, n_images: int, chunk: int, n_layers: int, n_heads: int, n_chosen: int, width: int, dim: int,
                 budget: int | None) -> ExplainPlan:
    """Keep every image's head contributions when they fit ``budget`` bytes, else stream them (chunks halved until
    the second moments and one chunk fit).

    Estimates (bytes): contributions of ``n`` images = ``n x (S H + 2 L + 1) x D x 4`` (heads of the ``S`` chosen
    layers, attention and MLP terms, embedding); one chunk's work = ``chunk x L x H x (W + 2 D) x 4`` (the heads'
    outputs in the model's width and their linearised terms) + the chunk's contributions; the moments =
    ``S H x (D^2 + D) x 8``.

    Raises:
        ClipHeadsError: the budget does not hold the moments and a chunk of one image.
    """
    def work(rows: int) -> int:
        terms = (n_chosen * n_heads + 2 * n_layers + 1) * dim
        return rows * (n_layers * n_heads * (width + 2 * dim) + terms) * 4

    chunk = max(1, min(int(chunk), n_images))
    everything = n_images * (n_chosen * n_heads + 2 * n_layers + 1) * dim * 4 + work(chunk)
    if budget is None or everything <= budget:
        return ExplainPlan(False, n_images, chunk, everything, budget)
    moments = n_chosen * n_heads * (dim * dim + dim) * 8
    rows = chunk
    while rows > 1 and moments + work(rows) > budget:
        rows //= 2
    if moments + work(rows) > budget:
        raise ClipHeadsError(f"memory budget {format_size(budget)} is too small for the head explanations: the second "
                             f"moments of {n_chosen * n_heads} heads ({format_size(moments)}) and a chunk of one "
                             f"image ({format_size(work(1))}) need {format_size(moments + work(1))}")
    return ExplainPlan(True, n_images, rows, moments + work(rows), budget)


PIXEL_SHARE = 4  # the search split's pixels may take a quarter of the budget


def plan_pixels(n_images: int, image_size: int, budget: int | None) -> str:
    """How the search split's pixels are kept (see :mod:`clipheads.search.pixels`): ``float32`` when they take at
    most a quarter of ``budget`` bytes (or with no budget), else ``uint8`` (exact codes, a quarter of the size) when
    that fits the quarter, else ``disk`` (re-read per batch, nothing kept)."""
    values = n_images * 3 * image_size * image_size
    if budget is None or 4 * values <= budget // PIXEL_SHARE:
        return "float32"
    return "uint8" if values <= budget // PIXEL_SHARE else "disk"


__all__ = ["CachePlan", "ExplainPlan", "default_budget", "format_size", "host_available", "parse_size", "plan_cache",
           "plan_explain", "plan_pixels"]
