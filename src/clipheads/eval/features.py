"""Encode once, score many: text and image features with an in-memory and an optional on-disk cache.

* Text features are computed once per (model, texts) and reused for every head mask.
* Image features are kept per (model, mask, operator, images); only the last ``max_image_sets`` sets per model
  stay in memory, so a search over thousands of masks does not grow without bound.
* With ``cache_dir``, features are also written as safetensors (``features [N, D]``, ``kept [N]``) with a JSON
  sidecar, keyed by content: the model's name and a hash of its weights, the mask's gates, the operator, the
  precision, and the texts or the bytes of the image files.

The in-memory cache belongs to the model object and notices in-place weight updates (an optimiser step, ``bake``
with ``inplace=True``) through the parameters' version counters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn
from tqdm.auto import tqdm

from clipheads.data.images import as_source, image_loader, iter_pixels
from clipheads.errors import ClipHeadsError, DataError, OutputError
from clipheads.files import write_bytes_atomic, write_json_atomic
from clipheads.interventions import HeadMask, Operator, ablate
from clipheads.interventions.operators import resolve_operator
from clipheads.models import CLIPBackend, as_backend
from clipheads.precision import parse_precision
from clipheads.runkey import ImagesKey, WeightsKey

logger = logging.getLogger(__name__)

CACHE_FORMAT = "clipheads.features/1"


@dataclass
class EncodeOptions:
    """How features are computed (none of these change what is computed, except ``precision``)."""

    batch_size: int = 64  # images per batch
    text_batch_size: int = 256
    num_workers: int = 0  # DataLoader workers that read and preprocess images
    precision: str = "fp32"  # open_clip's names (clipheads.precision): amp / amp_bf16 autocast; fp16, bf16 ... weights
    skip_bad: bool = False  # leave out (and count) missing or corrupt images instead of stopping
    progress: bool = False  # tqdm progress bars
    cache: FeatureCache | None = None  # None: the process-wide in-memory cache

    def __post_init__(self) -> None:
        self.precision = parse_precision(self.precision).name  # one line for an unknown name; amp_bfloat16 -> amp_bf16

    @classmethod
    def make(cls, options: EncodeOptions | None = None, **overrides) -> EncodeOptions:
        """``options`` (or the defaults) with some fields replaced, e.g. ``EncodeOptions.make(batch_size=32)``."""
        return replace(options or cls(), **overrides)


@dataclass
class EncodedImages:
    """Features of the readable images: ``features [N_kept, D]`` (L2-normalised, float32, CPU) belong to the
    requested positions ``kept [N_kept]``; ``skipped`` lists the files left out."""

    features: torch.Tensor
    kept: torch.Tensor
    skipped: list[str] = field(default_factory=list)


def _sha(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def _weights_version(model: nn.Module) -> int:
    return sum(p._version for p in model.parameters())


def model_fingerprint(backend: CLIPBackend) -> dict:
    """Identity of a model for the disk cache: name, class, image size and a sha256 of every weight (the
    :class:`~clipheads.runkey.WeightsKey` of its weights, computed once per weight version)."""
    return {"name": backend.name, "class": type(backend.model).__name__, "image_size": backend.image_size,
            "weights_sha256": WeightsKey.of(backend.model).sha256}


def _file_sha(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return f"unreadable:{path}"


class FeatureCache:
    """Features already computed, per model object in memory, and by content hash on disk when ``cache_dir`` is set.

    Args:
        cache_dir: folder for safetensors + JSON sidecar files (created); ``None`` keeps features in memory only.
        max_image_sets: image feature sets kept in memory per model (least recently used are dropped).
    """

    def __init__(self, cache_dir: str | Path | None = None, max_image_sets: int = 16) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_image_sets = max_image_sets
        self._memory: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()
        self.hits = {"memory": 0, "disk": 0}
        self.misses = 0

    def _store(self, model: nn.Module) -> OrderedDict:
        if model not in self._memory:
            self._memory[model] = OrderedDict()
        return self._memory[model]

    def get(self, backend: CLIPBackend, memory_key: str, disk_key: str | None = None):
        """The cached value of ``memory_key`` (or, on disk, of ``disk_key``), or None."""
        store = self._store(backend.model)
        if memory_key in store:
            store.move_to_end(memory_key)
            self.hits["memory"] += 1
            return store[memory_key]
        if disk_key is not None and self.cache_dir is not None:
            value = self._read(disk_key)
            if value is not None:
                self.hits["disk"] += 1
                self._remember(store, memory_key, value)
                return value
        self.misses += 1
        return None

    def put(self, backend: CLIPBackend, memory_key: str, value, disk_key: str | None = None,
            meta: dict | None = None) -> None:
        self._remember(self._store(backend.model), memory_key, value)
        if disk_key is not None and self.cache_dir is not None:
            self._write(disk_key, value, meta or {})

    def _remember(self, store: OrderedDict, key: str, value) -> None:
        store[key] = value
        store.move_to_end(key)
        image_keys = [k for k in store if k.startswith("image:")]
        for old in image_keys[:max(0, len(image_keys) - self.max_image_sets)]:
            del store[old]

    def clear(self) -> None:
        """Forget what is in memory (files on disk stay)."""
        self._memory = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ disk
    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.cache_dir / f"{key}.safetensors", self.cache_dir / f"{key}.json"

    def _read(self, key: str):
        tensors_path, sidecar_path = self._paths(key)
        if not (tensors_path.is_file() and sidecar_path.is_file()):
            return None
        try:
            sidecar = json.loads(sidecar_path.read_text())
            tensors = load_file(tensors_path)
        except (OSError, ValueError) as exc:  # a damaged entry is recomputed, not fatal
            logger.warning("ignoring unreadable feature cache entry %s (%s)", tensors_path, exc)
            return None
        if sidecar.get("key") != key:
            return None
        if sidecar["kind"] == "text":
            return tensors["features"]
        return EncodedImages(tensors["features"], tensors["kept"], sidecar.get("skipped", []))

    def _write(self, key: str, value, meta: dict) -> None:
        tensors_path, sidecar_path = self._paths(key)
        if isinstance(value, EncodedImages):
            tensors = {"features": value.features.contiguous(), "kept": value.kept.contiguous()}
            meta = {**meta, "kind": "image", "skipped": value.skipped}
        else:
            tensors = {"features": value.contiguous()}
            meta = {**meta, "kind": "text"}
        try:
            write_bytes_atomic(tensors_path, save_tensors(tensors))
            write_json_atomic(sidecar_path, {"format": CACHE_FORMAT, "key": key, "created": time.time(), **meta})
        except OutputError as exc:  # the cache is a convenience: a full disk must not cost the evaluation
            logger.warning("features not cached: %s", exc)


DEFAULT_CACHE = FeatureCache()


def precision_context(device: torch.device, precision: str):
    """``torch.autocast`` for ``amp`` (fp16) and ``amp_bf16``; nothing for the others (:mod:`clipheads.precision`)."""
    return parse_precision(precision).autocast(device)


def check_precision(backend: CLIPBackend, precision: str) -> None:
    """Refuse (one line) a precision that holds the weights in fp16/bf16 on a model whose weights are not: the
    features would claim a precision they were not computed in. ``fp32``/``amp``/``amp_bf16`` run the model as held."""
    wanted = parse_precision(precision)
    if wanted.weights != torch.float32 and backend.dtype != wanted.weights:
        autocast = {torch.float16: "amp", torch.bfloat16: "amp_bf16"}[wanted.weights]
        raise ClipHeadsError(f"precision {wanted.name} holds the weights in {wanted.weights} but this model's are "
                             f"{backend.dtype}: load it with clipheads.load(..., dtype={wanted.name!r}), or use "
                             f"{autocast} for autocast")


def _ablation(backend: CLIPBackend, mask: HeadMask | None, op: str | Operator, alpha: float | None
              ) -> tuple[HeadMask | None, Operator | None]:
    """The mask and operator that will be active (``None, None`` for the untouched model)."""
    if backend.intervention is not None:
        if mask is not None:
            raise ClipHeadsError("this model already has an ablation applied; pass mask= only to an unablated model")
        if not hasattr(backend.intervention, "operator"):  # clipheads.patch: outputs depend on its source images
            raise ClipHeadsError("evaluation does not run inside clipheads.patch (the patched outputs belong to its "
                                 "source images); use patch_effects or encode_image there")
        return backend.intervention.mask, backend.intervention.operator
    if mask is None or mask.is_identity():
        return None, None
    name = op.name if isinstance(op, Operator) else op
    has_means = isinstance(op, Operator) and op.means is not None
    return mask, resolve_operator(op, alpha=alpha, means=mask.means if name == "mean" and not has_means else None)


def ablation_key(mask: HeadMask | None, operator: Operator | None) -> str:
    """``none`` for the untouched model, else a hash of the gates and the operator (with its head means)."""
    if mask is None:
        return "none"
    means = operator.means.detach().cpu().float().numpy().tobytes() if operator.means is not None else b""
    return _sha(mask.key(), repr(mask.shape), operator.describe(), means)


@torch.inference_mode()
def encode_text_batches(backend: CLIPBackend, texts: Sequence[str], batch_size: int = 256, *,
                        progress: bool = False) -> torch.Tensor:
    """``[N, D]`` L2-normalised float32 text features, batch by batch, uncached (also for a model in training)."""
    starts = range(0, len(texts), batch_size)
    chunks = [backend.encode_text(list(texts[start:start + batch_size]), normalize=True).float().cpu()
              for start in tqdm(starts, desc="texts", unit="batch", disable=not progress, leave=False)]
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


UNKNOWN_WORDS_WARN = 0.5  # warn when more than this fraction of the words of a text set are unknown to the model
_WARNED: set[str] = set()


def unknown_word_fraction(backend: CLIPBackend, texts: Sequence[str], sample: int = 2000) -> float:
    """The fraction of the (non-special) tokens of ``texts`` (the first ``sample``) that the model's tokenizer maps to
    its unknown token; 0.0 for tokenizers that have none or spell every word (BPE, as real CLIP models)."""
    tokenizer = getattr(backend, "tokenizer", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tokenizer is None or unk is None or not texts:
        return 0.0
    try:
        ids = tokenizer(list(texts[:sample]), add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot run here is judged when encoding, not here
        return 0.0
    total = sum(len(row) for row in ids)
    return sum(token == unk for row in ids for token in row) / total if total else 0.0


def warn_unknown_words(backend: CLIPBackend, texts: Sequence[str]) -> None:
    """One warning line when most words of ``texts`` are unknown to the model (the bundled model on real captions)."""
    fraction = unknown_word_fraction(backend, texts)
    if fraction <= UNKNOWN_WORDS_WARN or backend.name in _WARNED:
        return
    _WARNED.add(backend.name)
    what = ("the bundled model knows only the 28 words of its world" if backend.name == "bundled"
            else f"{backend.name}'s tokenizer")
    logger.warning("%s: %.0f%% of the words of these texts are unknown to it, so its scores say little; choose a "
                   "model with --model (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k or openai/clip-vit-base-patch32)",
                   what, 100 * fraction)


@torch.no_grad()
def encode_pixel_batches(backend: CLIPBackend, batches: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 64,
                         *, normalize: bool = False, progress: bool = False) -> torch.Tensor:
    """``[N, D]`` float32 CPU image features of ``[N, 3, H, W]`` preprocessed pixels (split into ``batch_size``
    batches) or of an iterable of pixel batches, uncached, with whatever ablation is active on ``backend``.

    The one image encoder behind :func:`encode_images` (files, cached), the captioner's and the world's.
    ``normalize`` L2-normalises each row. Runs under ``no_grad`` (not inference mode), so the features can feed a
    model in training. Raises :class:`DataError` when there is no image.
    """
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    features = [backend.encode_image(batch, normalize=normalize).float().cpu()
                for batch in tqdm(batches, desc="encoding images", unit="batch", disable=not progress, leave=False)]
    if not features:
        raise DataError("no images to encode")
    return torch.cat(features)


@torch.inference_mode()
def encode_texts(model: CLIPBackend | nn.Module, texts: Sequence[str], options: EncodeOptions | None = None,
                 **overrides) -> torch.Tensor:
    """``[N, D]`` L2-normalised float32 text features (the text tower is never ablated; each text encoded once)."""
    backend = as_backend(model)
    opts = EncodeOptions.make(options, **overrides)
    check_precision(backend, opts.precision)
    cache = opts.cache or DEFAULT_CACHE
    texts = list(texts)
    texts_sha = _sha(*texts)
    memory_key = f"text:{texts_sha}:{opts.precision}:{_weights_version(backend.model)}"
    disk_key = None
    if cache.cache_dir is not None:
        fingerprint = model_fingerprint(backend)
        disk_key = "text-" + _sha(json.dumps(fingerprint, sort_keys=True), texts_sha, opts.precision)[:40]
    cached = cache.get(backend, memory_key, disk_key)
    if cached is not None:
        return cached
    unique = list(dict.fromkeys(texts))
    warn_unknown_words(backend, unique)
    with precision_context(backend.device, opts.precision):
        features = encode_text_batches(backend, unique, opts.text_batch_size, progress=opts.progress)
    row = {text: i for i, text in enumerate(unique)}
    features = features[torch.tensor([row[t] for t in texts], dtype=torch.long)]
    meta = {"model": model_fingerprint(backend) if disk_key else None, "n_items": len(texts),
            "items_sha256": texts_sha, "precision": opts.precision}
    cache.put(backend, memory_key, features, disk_key, meta)
    return features


@torch.inference_mode()
def encode_images(model: CLIPBackend | nn.Module, paths: Sequence[str | Path], mask: HeadMask | None = None,
                  op: str | Operator = "identity", *, alpha: float | None = None, options: EncodeOptions | None = None,
                  **overrides) -> EncodedImages:
    """Image features of ``paths`` through the model's own preprocessing and image encoder, with ``mask`` ablated.

    Args:
        model: a backend (:func:`clipheads.load`) or a library CLIP model, on the device to run on.
        paths: image files; a file listed twice is read once.
        mask, op, alpha: the ablation (see :func:`clipheads.ablate`); ``None`` evaluates the model as it is.
        options / overrides: :class:`EncodeOptions` (batch size, workers, precision, skip_bad, progress, cache).

    Returns:
        :class:`EncodedImages` with ``features [N_kept, D]`` for the positions ``kept`` of ``paths`` that could be
        read. A bad image raises :class:`DataError` naming it unless ``skip_bad``.
    """
    backend = as_backend(model)
    opts = EncodeOptions.make(options, **overrides)
    check_precision(backend, opts.precision)
    cache = opts.cache or DEFAULT_CACHE
    paths = [as_source(p) for p in paths]  # files, or ImageRef (tar members, Hugging Face dataset cells)
    if not paths:
        raise DataError("no images to encode")
    active_mask, operator = _ablation(backend, mask, op, alpha)
    ablated = ablation_key(active_mask, operator)
    paths_sha = ImagesKey.of(paths, "/").digest  # absolute paths, sizes and mtimes: a changed file is a miss
    memory_key = f"image:{paths_sha}:{ablated}:{opts.precision}:{_weights_version(backend.model)}"
    disk_key = meta = None
    if cache.cache_dir is not None:
        fingerprint = model_fingerprint(backend)
        files_sha = _sha(*(_file_sha(p) for p in paths))
        disk_key = "image-" + _sha(json.dumps(fingerprint, sort_keys=True), files_sha, ablated, opts.precision)[:40]
        meta = {"model": fingerprint, "mask": active_mask.ablated if active_mask is not None else [],
                "operator": operator.to_dict() if operator is not None else None, "precision": opts.precision,
                "n_items": len(paths), "items_sha256": files_sha}
    encoded = cache.get(backend, memory_key, disk_key)
    if encoded is None:
        encoded = _encode_images(backend, paths, active_mask if mask is not None else None, operator, opts)
        cache.put(backend, memory_key, encoded, disk_key, meta)
    if encoded.skipped and not opts.skip_bad:
        raise DataError(f"cannot read image {encoded.skipped[0]!r}; fix or remove it, or skip bad images (--skip-bad)")
    return encoded


def _encode_images(backend: CLIPBackend, paths: list[Path], mask: HeadMask | None, operator: Operator | None,
                   opts: EncodeOptions) -> EncodedImages:
    unique = list(dict.fromkeys(paths))
    loader = image_loader(unique, backend.preprocess, opts.batch_size, opts.num_workers)
    skipped: list[str] = []
    rows: dict[int, torch.Tensor] = {}
    ablation = ablate(backend, mask, operator) if mask is not None else nullcontext()
    with ablation, precision_context(backend.device, opts.precision):
        for batch in iter_pixels(loader, opts.skip_bad, skipped, opts.progress):
            features = encode_pixel_batches(backend, [batch.pixels], normalize=True)
            rows.update(zip(batch.indices.tolist(), features, strict=True))
    if not rows:
        raise DataError(f"none of the {len(unique)} images could be read (first: {str(unique[0])!r})")
    index = {path: i for i, path in enumerate(unique)}
    kept = [n for n, path in enumerate(paths) if index[path] in rows]
    features = torch.stack([rows[index[paths[n]]] for n in kept])
    return EncodedImages(features, torch.tensor(kept, dtype=torch.long), skipped)
