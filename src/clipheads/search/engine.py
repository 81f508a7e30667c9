"""Evaluating many head masks fast: cached residual streams, several masks per forward, and a memo.

* The residual stream entering every layer is computed once for the evaluation images with the unablated model
  (``embed`` + ``run_layers``). A mask whose first ablated layer is ``l`` recomputes only layers ``l`` and later
  (from the nearest cached layer at or before ``l`` when only every ``cache_stride``-th layer is kept: the unablated
  layers in between run once per image, as when the cache was built, so the scores do not depend on the stride).
* Masks are grouped by the cached layer they resume from and stacked along the batch: ``k`` masks x ``b`` images run as
  one ``[k*b, T, W]`` forward, with one hook per layer that gives each mask's chunk of the batch its own gate row.
* Where the backend can split a layer into attention and the rest, the first recomputed layer's attention is computed
  once for the ``b`` images (the masks of a group differ only in how its heads are mixed), and the last layer runs
  for the class token only, the one token the image embedding reads (a tower read by an attention-pooling head,
  SigLIP, reads every token: its last layer runs whole, ``readout_tokens`` is ``None``).
* A mask is evaluated once: scores are memoised by the operator and the mask's gates.
* Under ``torchrun`` the groups are shared out over ranks and the scores gathered on every rank. Groups are formed
  before sharding, so a mask's score does not depend on the number of processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from clipheads.errors import ClipHeadsError
from clipheads.interventions import HeadMask, Operator, resolve_operator
from clipheads.models import CLIPBackend, parse_dtype
from clipheads.search.distributed import SINGLE, Distributed
from clipheads.search.memory import CachePlan, parse_size, plan_cache
from clipheads.search.objectives import Objective

log = logging.getLogger(__name__)


def stacked_gate_hook(operator: Operator, layer_gates: torch.Tensor, layer: int) -> Callable:
    """A head hook for a batch made of ``k`` equal chunks, chunk ``i`` gated by ``layer_gates[i]`` (``[k, H]``).

    Same arithmetic as :meth:`Operator.mix` (``g*z + (1-g)*replacement``), with one gate row per sample.
    """
    k, n_heads = layer_gates.shape

    def hook(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # z, v: [k*b, T, H, d]
        g = layer_gates.to(z.device, z.dtype).repeat_interleave(z.shape[0] // k, dim=0).view(-1, 1, n_heads, 1)
        return g * z + (1 - g) * operator.replacement(z, v, layer)

    return hook


@contextmanager
def stacked_gates(backend: CLIPBackend, operator: Operator, gates: torch.Tensor,
                  layers: Sequence[int] | None = None) -> Iterator[None]:
    """Hook ``layers`` (default: all) with :func:`stacked_gate_hook` rows of ``gates [k, L, H]`` while inside; the
    hooks are removed on exit, also on errors."""
    try:
        for layer in range(backend.n_layers) if layers is None else layers:
            backend.set_head_hook(layer, stacked_gate_hook(operator, gates[:, layer], layer))
        yield
    finally:
        backend.clear_head_hooks()


def first_layer(mask: HeadMask) -> int | None:
    """The first layer with an ablated (or soft-gated) head, ``None`` for a mask that keeps every head."""
    layers = mask.layers
    return layers[0] if layers else None


class MaskEvaluator:
    """Scores head masks on a fixed image set: ``objective(image features of the ablated model)``.

    Args:
        backend: the model (left unablated; the evaluator installs and removes its own hooks).
        pixels: ``[N, 3, H, W]`` preprocessed evaluation images.
        objective: image features ``[N, D]`` -> float, higher is better (text features cached inside it).
        op, alpha, means: the ablation operator (see :mod:`clipheads.interventions.operators`).
        batch_size: most rows (images x stacked masks) in one forward.
        masks_per_forward: masks stacked per forward (default: as many as ``batch_size`` allows, at least 1).
        cache_stride: keep the residual entering every ``cache_stride``-th layer (1 = every layer, most memory);
            default: 1, or the planner's choice under a ``memory_budget``.
        memory_budget: bytes (or a size such as ``"8GiB"``) for the cache and one forward; the evaluator then plans
            its cache (:func:`~clipheads.search.memory.plan_cache`: fewer cached layers, smaller image chunks, the
            host's memory on CUDA). ``None``: everything kept where the model runs (the all-in-memory path).
        cache_dtype: dtype of the cached residuals (default the model's; a lower one changes scores slightly).
        plan: a :class:`~clipheads.search.memory.CachePlan` to use as it is (overrides the three above).
        other_bytes: bytes the caller holds in the same memory (e.g. decoded pixels), counted against the budget.
        split: name of the image set (for refusing to report on the split that was searched).
        distributed: rank and world size (default: one process).
        shard_images: under ``torchrun``, every rank keeps the cache of only its share of the images
            (:meth:`~clipheads.search.distributed.Distributed.image_share`) and evaluates every mask on it; the
            features are gathered for the objective (scores equal one process's to float rounding). Default: masks
            are shared out instead and every rank caches every image. AAT-BP needs every image's cache (it reads
            random rows of it) and refuses a sharded evaluator.
        progress: show a progress bar over forward groups (main rank only).
    """

    def __init__(self, backend: CLIPBackend, pixels: torch.Tensor, objective: Objective,
                 op: str | Operator = "identity", *, alpha: float | None = None, means: torch.Tensor | None = None,
                 batch_size: int = 64, masks_per_forward: int | None = None, cache_stride: int | None = None,
                 split: str = "", distributed: Distributed = SINGLE, progress: bool = False,
                 memory_budget: int | str | None = None, cache_dtype: torch.dtype | str | None = None,
                 plan: CachePlan | None = None, other_bytes: int = 0, shard_images: bool = False) -> None:
        backend.require_unablated("the search (it installs its own hooks)")
        if len(pixels) == 0:
            raise ClipHeadsError(f"no evaluation images for the search{f' (split {split!r})' if split else ''}")
        self.backend = backend
        self.objective = objective
        self.operator = resolve_operator(op, alpha=alpha, means=means).check_fits(backend)
        self.n_images = len(pixels)
        self.sharded = shard_images and distributed.active and self.n_images >= distributed.world_size
        self.share = distributed.image_share(self.n_images) if self.sharded else slice(0, self.n_images)
        if self.sharded:  # this rank's images; a pixel store stays a store (its uint8 codes are not decoded here)
            pixels = pixels.subset(self.share) if hasattr(pixels, "subset") else pixels[self.share]
        self.plan = plan or self._plan(backend, pixels, batch_size, memory_budget, cache_dtype, cache_stride,
                                       other_bytes)
        log.info("search cache (%d images): %s", self.n_images, self.plan.describe())
        self.batch_size = self.plan.rows
        self.image_batch = min(len(pixels), self.batch_size)
        self.masks_per_forward = min(masks_per_forward or max(1, self.batch_size // len(pixels)), self.batch_size)
        self.split = split
        self.distributed = distributed
        self.progress = progress
        self.n_layers, self.n_heads = backend.n_layers, backend.n_heads
        self.cached_layers = list(range(0, self.n_layers, self.plan.cache_stride))
        # split layers: share the first recomputed layer's attention over masks, last layer for the class token only
        self.fast_path = backend.supports_layer_split  # readout_tokens None (attention pool): last layer runs whole
        self.n_forward_masks = 0  # masks evaluated by a forward pass (all ranks together)
        self.n_local_masks = 0  # of those, the masks this rank evaluated
        self._cache, self.baseline_features = self._build_cache(pixels)
        self.baseline = float(objective(self.baseline_features))
        self._memo: dict[bytes, float] = {self._key(HeadMask.ones(backend)): self.baseline}

    # ------------------------------------------------------------------ cache
    @staticmethod
    @torch.no_grad()
    def _plan(backend: CLIPBackend, pixels: torch.Tensor, batch_size: int, budget: int | str | None,
              cache_dtype: torch.dtype | str | None, cache_stride: int | None, other_bytes: int) -> CachePlan:
        if isinstance(cache_dtype, str):
            cache_dtype = parse_dtype(cache_dtype)
        tokens, width = backend.embed(pixels[:1].to(backend.device, backend.dtype)).shape[1:]
        return plan_cache(n_images=len(pixels), n_layers=backend.n_layers, n_heads=backend.n_heads, tokens=tokens,
                          width=width, model_dtype=backend.dtype, batch_size=batch_size,
                          budget=None if budget is None else parse_size(budget), device=backend.device,
                          cache_dtype=cache_dtype, cache_stride=cache_stride, other_bytes=other_bytes)

    @torch.no_grad()  # not inference_mode: AAT-BP back-propagates from these tensors into the gates
    def _build_cache(self, pixels: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        backend, plan = self.backend, self.plan
        host = plan.location == "host"
        cache: dict[int, torch.Tensor] = {}
        features = []
        for i in range(0, len(pixels), self.image_batch):
            x = backend.embed(pixels[i:i + self.image_batch].to(backend.device, backend.dtype))
            for layer in range(self.n_layers):
                if layer in self.cached_layers:
                    if layer not in cache:  # filled in place: no second copy while concatenating
                        cache[layer] = torch.empty((len(pixels), *x.shape[1:]), dtype=plan.torch_dtype,
                                                   device="cpu" if host else x.device,
                                                   pin_memory=host and x.device.type == "cuda")
                    cache[layer][i:i + len(x)].copy_(x)
                x = backend.run_layers(x, layer, layer + 1)
            features.append(backend.pool(x))
        return cache, self._gathered(torch.cat(features))

    def _gathered(self, features: torch.Tensor) -> torch.Tensor:
        """All images' features ``[N, ...]`` from this rank's rows (the rows themselves unless sharded)."""
        return self.distributed.gather_rows(features, self.n_images) if self.sharded else features

    def _begin(self, layer: int) -> int:
        """The cached layer a mask whose first ablated layer is ``layer`` resumes from."""
        return max(cached for cached in self.cached_layers if cached <= layer)

    def residual(self, layer: int) -> torch.Tensor:
        """Cached residual stream entering ``layer`` (must be a cached layer), ``[N, T, W]``, as stored (the plan's
        dtype and location; :meth:`residual_rows` gives rows ready for the model)."""
        return self._cache[layer]

    def residual_rows(self, layer: int, rows: slice | torch.Tensor) -> torch.Tensor:
        """Rows of the cached residual entering ``layer`` on the model's device in its dtype, ``[b, T, W]`` (rows of
        this rank's :attr:`share` of the images when ``shard_images``)."""
        cache = self._cache[layer]
        if isinstance(rows, torch.Tensor):
            rows = rows.to(cache.device)
        return cache[rows].to(self.backend.device, self.backend.dtype, non_blocking=True)

    # ------------------------------------------------------------------- memo
    def _key(self, mask: HeadMask) -> bytes:
        return self.operator.describe().encode() + b"|" + mask.key()

    def known(self, mask: HeadMask) -> float | None:
        """The memoised score of ``mask``, if it was evaluated."""
        return self._memo.get(self._key(mask))

    def remember(self, mask: HeadMask, score: float) -> None:
        """Pre-load a score (e.g. from a checkpoint) so that ``mask`` is not evaluated again."""
        self._memo[self._key(mask)] = float(score)

    @property
    def n_evaluated(self) -> int:
        """Distinct masks scored so far (memo size, the unablated model included)."""
        return len(self._memo)

    # -------------------------------------------------------------- evaluation
    def evaluate(self, mask: HeadMask, desc: str = "masks") -> float:
        return self.evaluate_many([mask], desc=desc)[0]

    def evaluate_many(self, masks: Sequence[HeadMask], desc: str = "masks") -> list[float]:
        """Scores of ``masks``, in order. New masks are batched, sharded over ranks and memoised.

        ``desc`` names the progress bar (the stage: ``"AAT-GA generation 3/12"``), shown with ``progress=True``.
        """
        pending: dict[bytes, HeadMask] = {}
        for mask in masks:
            mask.check(self.backend)
            key = self._key(mask)
            if key not in self._memo and key not in pending:
                pending[key] = mask
        if pending:
            groups = self._groups(list(pending.items()))
            mine = list(enumerate(groups)) if self.sharded else self.distributed.shard(list(enumerate(groups)))
            local: dict[bytes, float] = {}
            bar = tqdm(mine, desc=desc, unit="group", disable=not (self.progress and self.distributed.is_main),
                       leave=False)
            for _, group in bar:
                for (key, _), features in zip(group, self._features([m for _, m in group]), strict=True):
                    local[key] = float(self.objective(features))
            self.n_local_masks += len(local)
            self._memo.update(local if self.sharded else self.distributed.gather(local))
            self.n_forward_masks += len(pending)
        return [self._memo[self._key(mask)] for mask in masks]

    def features_many(self, masks: Sequence[HeadMask]) -> list[torch.Tensor]:
        """Image features ``[N, D]`` of each mask (not memoised, not sharded: for small sets like layer scans)."""
        out: list[torch.Tensor] = []
        for group in self._groups(list(enumerate(masks))):
            out.extend(zip([i for i, _ in group], self._features([m for _, m in group]), strict=True))
        return [features for _, features in sorted(out, key=lambda item: item[0])]

    def _groups(self, items: list[tuple]) -> list[list[tuple]]:
        """Stack masks that resume from the same cached layer; a deterministic order independent of the world size."""
        def start(item) -> int:
            layer = first_layer(item[1])
            return self.n_layers if layer is None else self._begin(layer)

        ordered = sorted(items, key=start)  # stable: ties keep their order
        groups: list[list[tuple]] = []
        for item in ordered:
            if groups and len(groups[-1]) < self.masks_per_forward and start(groups[-1][0]) == start(item):
                groups[-1].append(item)
            else:
                groups.append([item])
        return groups

    @torch.no_grad()
    def _features(self, masks: list[HeadMask]) -> list[torch.Tensor]:
        """Image features of each mask of one group: ``k`` masks stacked along the batch, ``[N, D]`` each."""
        starts = [first_layer(m) for m in masks]
        if all(s is None for s in starts):
            return [self.baseline_features for _ in masks]
        backend, k = self.backend, len(masks)
        start = min(s for s in starts if s is not None)
        begin = self._begin(start)
        gates = torch.stack([m.gates.detach() for m in masks]).to(backend.device)  # [k, L, H]
        hooked = sorted({layer for m in masks for layer in m.layers})
        chunks = []
        with stacked_gates(backend, self.operator, gates, hooked):
            rows = max(1, self.batch_size // k)
            for i in range(0, len(self._cache[begin]), rows):
                x = self.residual_rows(begin, slice(i, i + rows))
                if begin < start:  # unablated layers between the cached one and the first ablated one, run as the
                    x = backend.run_layers(x, begin, start)  # cache was built: the residual it would have stored
                chunks.append(self._run_stacked(x, start, k).view(k, len(x), -1))
        return list(self._gathered(torch.cat(chunks, dim=1).transpose(0, 1)).transpose(0, 1).unbind(0))

    def _run_stacked(self, x: torch.Tensor, begin: int, k: int) -> torch.Tensor:
        """Image features ``[k*b, D]`` of ``k`` hooked masks (mask-major) from the residual ``x [b, T, W]`` entering
        layer ``begin``.

        With a backend that splits its layers, layer ``begin`` computes its attention once for the ``b`` images (the
        ``k`` masks differ only in how its heads are mixed afterwards) and the last layer runs for the read-out token
        only (the class token's row of the attention; its keys and values still come from every token).
        """
        backend = self.backend
        if not self.fast_path:
            return backend.pool(backend.run_layers(x.repeat(k, 1, 1), begin))  # [k*b, T, W], mask-major
        last, readout = self.n_layers - 1, backend.readout_tokens
        x = backend.run_layer_split(begin, x, readout if begin == last else None, repeat=k)
        if begin < last and readout is None:  # the pool reads every token: the library's own last layer
            x = backend.run_layers(x, begin + 1)
        elif begin < last:
            x = backend.run_layer_split(last, backend.run_layers(x, begin + 1, last), readout)
        return backend.pool(x)
