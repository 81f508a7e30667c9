"""One thin protocol over the CLIP implementations of ``transformers`` and ``open_clip``.

A backend wraps the library's own model object (``backend.model``) and never re-implements it. It knows:

* the shape of the image encoder's attention (``n_layers``, ``n_heads``, ``head_dim``);
* the library's own ``encode_image`` / ``encode_text`` paths, image preprocessing and tokenizer;
* a *staged* view of the image tower (``embed`` -> ``run_layers`` -> ``pool``) built from the library's own
  sub-modules, so that a search can cache the residual stream entering a layer;
* one attention site per layer, where a head hook sees the per-head attention output ``z`` and the values
  ``v`` (both ``[batch, pos, head, d_head]``) before the output projection and may replace ``z``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize

from clipheads.errors import ClipHeadsError

# hook(z, v) -> z', all [batch, pos, head, d_head]. A hook may carry ``hook.attention(weights) -> weights'`` (weights
# [batch, head, pos, pos]): what the layer's attention maps become under it (the ablation engine's hooks say what
# their operator did); without it the backends return the weights as computed.
HeadHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def hooked_weights(hook: HeadHook | None, weights: torch.Tensor | None) -> torch.Tensor | None:
    """Attention weights ``[B, H, Tq, T]`` as the layer's head hook leaves them (see :data:`HeadHook`)."""
    mapping = getattr(hook, "attention", None)
    return weights if weights is None or mapping is None else mapping(weights)

# what encode_image accepts (see CLIPBackend.as_pixels)
ImageInput = torch.Tensor | Image.Image | Sequence[Image.Image]
_EXPECTED_IMAGES = ("expected a PIL image, a list of PIL images, a uint8 tensor [B, 3, H, W] of raw pixels or a float "
                    "tensor [B, 3, H, W] already preprocessed (model.preprocess)")

# what a backend knows besides the weights (tokenizer, image processor, open_clip config), kept on the library model
# so that every wrapper of it, and a copy made by clipheads.bake, finds it again
_INPUTS_KEY = "_clipheads_inputs"


def remember_inputs(model: nn.Module, **inputs) -> None:
    """Keep the input side of a model (tokenizer, processor, config; ``None`` values are skipped) on the model."""
    store = model.__dict__.setdefault(_INPUTS_KEY, {})
    store.update({k: v for k, v in inputs.items() if v is not None})


def recall_input(model: nn.Module, name: str):
    """What :func:`remember_inputs` kept under ``name`` (``None`` if nothing)."""
    return model.__dict__.get(_INPUTS_KEY, {}).get(name)


@dataclass(frozen=True)
class Architecture:
    """What a head mask must match: the attention shape of an image encoder (and where it came from)."""

    n_layers: int
    n_heads: int
    head_dim: int
    width: int
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Architecture:
        return cls(**{k: data[k] for k in ("n_layers", "n_heads", "head_dim", "width") if k in data},
                   name=data.get("name", ""))


class CLIPBackend(ABC):
    """A loaded CLIP model seen through its image encoder's attention heads."""

    kind: str = ""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    @property
    def intervention(self):
        """The intervention applied with ``clipheads.apply`` (kept on the model, so every wrapper sees it)."""
        return self.model.__dict__.get("_clipheads_intervention")

    @intervention.setter
    def intervention(self, value) -> None:
        if value is None:
            self.model.__dict__.pop("_clipheads_intervention", None)
        else:
            self.model.__dict__["_clipheads_intervention"] = value

    # ----------------------------------------------------------------- shape
    @property
    @abstractmethod
    def architecture(self) -> Architecture: ...

    @property
    def n_layers(self) -> int:
        return self.architecture.n_layers

    @property
    def n_heads(self) -> int:
        return self.architecture.n_heads

    @property
    def head_dim(self) -> int:
        return self.architecture.head_dim

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------ inputs
    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> ``[3, H, W]`` float tensor, exactly as the library prepares it."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> keyword arguments for the library's text encoder."""

    # ----------------------------------------------------- library paths
    @abstractmethod
    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @property
    @abstractmethod
    def logit_scale(self) -> float: ...

    def as_pixels(self, images: ImageInput) -> torch.Tensor:
        """Images as users hold them -> preprocessed pixels ``[B, 3, H, W]`` (float, the model's input).

        Accepts one PIL image, a list/tuple of PIL images, a float tensor ``[B, 3, H, W]`` or ``[3, H, W]`` that is
        already preprocessed (used as is), or a ``uint8`` tensor ``[B, 3, H, W]``/``[3, H, W]`` of raw 0-255 pixels
        (e.g. from ``torchvision.io.read_image``), which goes through :meth:`preprocess` like a PIL image.

        Raises:
            ClipHeadsError: anything else (one line saying what is expected).
        """
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, list | tuple):
            if images and all(isinstance(im, Image.Image) for im in images):
                return torch.stack([self.preprocess(im) for im in images])
            kinds = sorted({type(im).__name__ for im in images}) or ["nothing"]
            raise ClipHeadsError(f"encode_image got a list of {', '.join(kinds)}; {_EXPECTED_IMAGES}")
        if isinstance(images, torch.Tensor) and images.dim() in (3, 4) and images.shape[-3] == 3:
            batch = images if images.dim() == 4 else images.unsqueeze(0)
            if batch.dtype == torch.uint8:
                from torchvision.transforms.functional import to_pil_image

                return torch.stack([self.preprocess(to_pil_image(im)) for im in batch.cpu()])
            if batch.is_floating_point():
                return batch
        what = (f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                else f"a {type(images).__name__}")
        raise ClipHeadsError(f"encode_image got {what}; {_EXPECTED_IMAGES}")

    def encode_image(self, pixels: ImageInput, normalize: bool = False) -> torch.Tensor:
        """Images -> ``[B, D]`` through the library's own image encoder (with any active ablation).

        ``pixels``: preprocessed ``[B, 3, H, W]`` float pixels, or images as :meth:`as_pixels` accepts them (PIL
        images, a list of them, raw ``uint8`` tensors), preprocessed with the model's own :meth:`preprocess`.
        """
        if not (isinstance(pixels, torch.Tensor) and pixels.dim() == 4 and pixels.shape[1] == 3
                and pixels.is_floating_point()):
            pixels = self.as_pixels(pixels)
        size = self.image_size
        if tuple(pixels.shape[-2:]) != (size, size):  # the library's own error is a traceback deep in its embeddings
            raise ClipHeadsError(f"encode_image got pixels of {pixels.shape[-2]}x{pixels.shape[-1]}; {self.name} takes "
                                 f"{size}x{size}: resize them with model.preprocess (or pass PIL images)")
        intervention = self.intervention
        calls = getattr(intervention, "calls", 0)
        features = self._encode_image(pixels.to(self.device, self.dtype))
        if intervention is not None and self.hooked_layers and intervention.calls == calls:
            raise ClipHeadsError(f"{self.name}: an ablation is applied but its hooks did not run during "
                                 "encode_image; the model's attention code path is not supported")
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: Sequence[str] | dict[str, torch.Tensor], normalize: bool = False) -> torch.Tensor:
        """Texts (or tokenized inputs) -> ``[B, D]`` through the library's own text encoder.

        ``texts``: a list of strings (``B`` of them), one string (``B = 1``), or the tokenizer's output.

        Raises:
            ClipHeadsError: no texts.
        """
        if isinstance(texts, str):  # list("a cat") would encode five one-letter texts
            texts = [texts]
        if not isinstance(texts, dict):
            texts = list(texts)
            if not texts:
                raise ClipHeadsError("encode_text got no texts; give a string or a list of strings")
        tokens = self.tokenize(texts) if not isinstance(texts, dict) else texts
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        features = self._encode_text(tokens)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    # ------------------------------------------------- staged image tower
    @abstractmethod
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> residual stream entering layer 0, ``[B, T, width]``."""

    @abstractmethod
    def run_layers(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run layers ``start .. end-1`` on the residual stream ``[B, T, width]``."""

    @abstractmethod
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last layer ``[B, T, width]`` -> image embedding ``[B, D]``."""

    # ----------------------------------- one layer in two steps (fast path of the mask search)
    # A layer = per-head attention (``layer_attention``) -> head hook -> out_proj + residual + MLP (``layer_finish``).
    # The search uses it to compute a layer's attention once for many masks, and to run the last layer for the
    # read-out token only. Backends that cannot split their layers leave ``supports_layer_split`` False.
    supports_layer_split: bool = False

    @property
    def readout_tokens(self) -> int | None:
        """How many leading tokens :meth:`pool` reads (1: the class token), ``None`` if it reads every token."""
        return None

    @property
    def prefix_tokens(self) -> int:
        """Tokens in front of the image patches in the residual stream (1: the class token; 0: none, SigLIP)."""
        return 1

    @property
    def has_class_token(self) -> bool:
        """Whether the residual stream's token 0 is a class token (what the ``cls`` operator attends to); ``False``
        for towers of patches only (SigLIP) or of register tokens without a class token."""
        return self.prefix_tokens > 0

    def attention_pool(self):
        """The probe-attention read-out (:class:`clipheads.models.pooling.AttentionPool`) of a tower that pools
        with an attention-pooling head instead of a class token; ``None`` for class-token towers."""
        return None

    def layer_attention(self, layer: int, x: torch.Tensor, queries: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head attention outputs ``z [B, Tq, H, d]`` (before any hook and ``out_proj``) and values
        ``v [B, T, H, d]`` of ``layer`` on the residual ``x [B, T, W]``; only the first ``queries`` positions attend
        (``None``: all)."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its layers")

    def layer_finish(self, layer: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The rest of ``layer``: ``x + out_proj(z)``, then the MLP block; ``x [B, Tq, W]`` is the residual at the
        positions of ``z``."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its layers")

    def attention_weights(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, H, T, T]`` of ``layer`` on the residual ``x [B, T, W]`` entering it, computed by the
        library's own code (transformers: the model's ``eager_attention_forward``; open_clip: the block's
        ``nn.MultiheadAttention`` with ``need_weights=True``), with the layer's head hook applied
        (:func:`hooked_weights`: an ablated head shows what its operator did). Rows sum to 1 for unablated heads."""
        raise ClipHeadsError(f"{self.name}: {type(self).__name__} cannot return attention weights")

    def head_hook(self, layer: int) -> HeadHook | None:
        return getattr(self.attention_module(layer), "_clipheads_hook", None)

    def run_layer_split(self, layer: int, x: torch.Tensor, queries: int | None = None, repeat: int = 1
                        ) -> torch.Tensor:
        """One layer through :meth:`layer_attention` and :meth:`layer_finish`, with its head hook; the residual at
        the first ``queries`` positions (all by default) after the layer.

        ``repeat``: the attention is computed once for ``x [b, T, W]`` and its outputs repeated ``repeat`` times
        along the batch (``[repeat*b, ...]``, repeat-major) before the hook, e.g. for several head masks whose hook
        gives each copy its own gates.
        """
        z, v = self.layer_attention(layer, x, queries)
        n_queries = z.shape[1]
        z = z.repeat(repeat, 1, 1, 1)
        hook = self.head_hook(layer)
        if hook is not None:
            z = hook(z, v[:, :n_queries].repeat(repeat, 1, 1, 1))  # the operators read the values at the queries
        return self.layer_finish(layer, x[:, :n_queries].repeat(repeat, 1, 1), z)

    def encode_image_staged(self, pixels: torch.Tensor) -> torch.Tensor:
        """Same result as :meth:`encode_image`, through the staged view (used to check the stages)."""
        return self.pool(self.run_layers(self.embed(pixels.to(self.device, self.dtype))))

    def encode_image_readout(self, pixels: torch.Tensor) -> torch.Tensor:
        """Same result as :meth:`encode_image` (with any head hooks), the last layer computed for the read-out tokens
        only, the only rows the image embedding reads; :meth:`encode_image` where the backend cannot split layers."""
        if not (self.supports_layer_split and self.readout_tokens is not None):
            return self.encode_image(pixels)
        last = self.n_layers - 1
        x = self.run_layers(self.embed(pixels.to(self.device, self.dtype)), 0, last)
        return self.pool(self.run_layer_split(last, x, self.readout_tokens))

    # ----------------------------------------------------- attention sites
    @abstractmethod
    def attention_module(self, layer: int) -> nn.Module:
        """The library's attention module of ``layer`` (holds the ``out_proj`` of that layer)."""

    def out_proj(self, layer: int) -> nn.Linear:
        """The output projection of ``layer``: ``weight`` is ``[width, n_heads * head_dim]``, head-major.

        Raises :class:`ClipHeadsError` when it carries an adapter (a peft layer or parametrized weights): its
        ``weight`` is then not what the model computes with (merge the adapter first, e.g. peft's
        ``merge_and_unload()``)."""
        proj = self.attention_module(layer).out_proj
        if not isinstance(proj, nn.Linear) or parametrize.is_parametrized(proj):
            raise ClipHeadsError(f"{self.name}: layer {layer}'s out_proj carries an adapter ({type(proj).__name__}), "
                                 "so its weight is not what the model computes with; merge the adapter into the "
                                 "weights first (peft: model.merge_and_unload())")
        return proj

    def set_head_hook(self, layer: int, hook: HeadHook | None) -> None:
        """Install (or with ``None`` remove) the per-head hook of ``layer``."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.n_layers - 1}")
        if hook is None:
            if layer in self.hooked_layers:
                self._uninstall(layer)
        else:
            self._install(layer, hook)

    def clear_head_hooks(self) -> None:
        for layer in self.hooked_layers:
            self._uninstall(layer)

    @property
    def hooked_layers(self) -> list[int]:
        """Layers with a head hook; read off the modules, so every wrapper of the same model agrees."""
        return [i for i in range(self.n_layers)
                if getattr(self.attention_module(i), "_clipheads_hook", None) is not None]

    def require_unablated(self, purpose: str) -> None:
        """Refuse (one line) to run ``purpose`` on a model with an ablation or head hook applied."""
        if self.intervention is not None or self.hooked_layers:
            raise ClipHeadsError(f"{purpose} needs the unablated model, but an ablation is applied; call "
                                 "clipheads.remove(model) first")

    @abstractmethod
    def _install(self, layer: int, hook: HeadHook) -> None: ...

    @abstractmethod
    def _uninstall(self, layer: int) -> None: ...

    # --------------------------------------------------------------- misc
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> CLIPBackend:
        self.model.to(device=device, dtype=dtype)
        return self

    def eval(self) -> CLIPBackend:
        self.model.eval()
        return self

    def __repr__(self) -> str:
        a = self.architecture
        return (f"{type(self).__name__}({self.name!r}, layers={a.n_layers}, heads={a.n_heads}, "
                f"head_dim={a.head_dim}, image_size={self.image_size})")


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters without gradients while inside (restored on exit, also on errors): a backward pass then computes
    only the gradients of what requires them (head gates), not of the weights."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
