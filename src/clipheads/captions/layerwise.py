"""Layer-wise attention cancellation with generated captions (the layer-wise study's Table 1).

For the unmodified model and for each cancelled layer or layer range, a decoder driven by the image encoder *with
that layer/range cancelled* generates a caption per image, by default continuing the caption the (cancelled) model
selected among the candidates ("a photo of a black cat" -> "a photo of a black cat sitting on a sink"). The
generated caption and the selected caption are both scored by the **unmodified** CLIP model (CLIPScore,
``100 * max(cos, 0)``), as in the study, so that the scores of different groups are comparable.

The cancellation is a real ``clipheads.ablate`` on the encoder the decoder reads: the CLIP backend for a prefix
captioner (ClipCap style), the model's own CLIP vision tower (``captioner.backend``) for a Hugging Face
``VisionEncoderDecoderModel``. ``encoder_cosine`` records how far that encoder's features moved (1.0: unchanged).

    captioning = LayerwiseCaptioning(load_captioner("captioner"), backend, pixels)
    rows = captioning([[], [0], [1, 2]], selected=None)   # [] = the unmodified model
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from clipheads.captions.captioners import Captioner, clip_scores, generate_captions
from clipheads.captions.encoder_decoder import VisionEncoderDecoderCaptioner
from clipheads.captions.prefix import PrefixCaptioner
from clipheads.captions.training import encode_images
from clipheads.errors import ClipHeadsError
from clipheads.heads import layer_group_label
from clipheads.interventions import HeadMask, ablate

log = logging.getLogger(__name__)

SCORE_MODEL = "unmodified"  # which CLIP scores every caption: the model with no layer cancelled


@dataclass
class LayerwiseCaptionConfig:
    """How the captions are generated.

    Attributes:
        num_beams: 1 for greedy decoding, more for beam search.
        max_new_tokens: most tokens generated after the text prefix.
        prefix_from_selection: continue the caption the (cancelled) model selected; otherwise no text prefix.
        prefix_words: with ``prefix_from_selection``, only the first ``prefix_words`` words of the selected caption
            are the prefix (``None``: all of it; candidates that are whole captions leave little to continue).
        op: ablation operator of the cancelled layers (the study: ``identity``, "value only").
        alpha: factor of the ``scale`` operator.
        n_images: caption only the first ``n_images`` images (``None``: all).
        batch_size: images per forward pass.
        captioner: name or folder of the captioner (recorded in the results).
    """

    num_beams: int = 1
    max_new_tokens: int = 20
    prefix_from_selection: bool = True
    prefix_words: int | None = None
    op: str = "identity"
    alpha: float | None = None
    n_images: int | None = None
    batch_size: int = 64
    captioner: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "clip_score_model": SCORE_MODEL}


@dataclass
class GroupCaptions:
    """Captions of one group (``layers``: ``"none"`` for the unmodified model, ``"3"``, ``"0-2"``), image by image.

    ``selected``/``selected_clip_score`` are empty when no selection was given, ``prefixes`` when the captions were
    generated without a text prefix. Scores: CLIPScore under the
    unmodified model. ``encoder_cosine``: mean cosine between the captioner's encoder features with and without
    the cancellation (1.0 for ``"none"``).
    """

    layers: str
    generated: list[str]
    generated_clip_score: list[float]
    selected: list[str]
    selected_clip_score: list[float]
    encoder_cosine: float
    prefixes: list[str]

    @property
    def mean_generated_clip_score(self) -> float:
        return sum(self.generated_clip_score) / len(self.generated_clip_score)

    @property
    def mean_selected_clip_score(self) -> float | None:
        if not self.selected_clip_score:
            return None
        return sum(self.selected_clip_score) / len(self.selected_clip_score)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "mean_selected_clip_score": self.mean_selected_clip_score,
                "mean_generated_clip_score": self.mean_generated_clip_score, "encoder_cosine": self.encoder_cosine,
                "images": [{"selected": s, "selected_clip_score": ss, "prefix": p, "generated": g,
                            "generated_clip_score": gs}
                           for s, ss, p, g, gs in zip(self.selected or [None] * len(self.generated),
                                                      self.selected_clip_score or [None] * len(self.generated),
                                                      self.prefixes or [None] * len(self.generated),
                                                      self.generated, self.generated_clip_score, strict=True)]}


def encoder_backend(captioner: Captioner, backend):
    """The backend whose encoder the captioner reads: ``backend`` (prefix captioner) or the model's own tower."""
    if isinstance(captioner, VisionEncoderDecoderCaptioner):
        return captioner.backend
    if isinstance(captioner, PrefixCaptioner):
        return backend
    raise ClipHeadsError(f"not a captioner: {type(captioner).__name__}")


class LayerwiseCaptioning:
    """Generates and scores captions for the unmodified model and for cancelled layer groups.

    Args:
        captioner: a :class:`PrefixCaptioner` (reads ``backend``'s image embedding) or a
            :class:`VisionEncoderDecoderCaptioner` (reads its own CLIP vision tower, whose layers are cancelled).
        backend: the CLIP model of the layer scan; unmodified, it scores every caption.
        pixels: ``[N, 3, H, W]`` images preprocessed for ``backend``.
        config: generation settings.
        caption_pixels: ``[N, 3, H', W']`` the same images preprocessed for the captioner's encoder (default:
            ``pixels``; an encoder-decoder with another input size or normalisation needs its own).
    """

    def __init__(self, captioner: Captioner, backend, pixels: torch.Tensor,
                 config: LayerwiseCaptionConfig | None = None, caption_pixels: torch.Tensor | None = None) -> None:
        self.config = config or LayerwiseCaptionConfig()
        if self.config.prefix_words is not None and self.config.prefix_words < 1:
            raise ClipHeadsError(f"prefix_words must be >= 1 (got {self.config.prefix_words})")
        if self.config.op == "mean":
            raise ClipHeadsError("generated captions support the operators identity, cls, zero and scale, not mean")
        self.captioner = captioner
        self.backend = backend
        self.encoder = encoder_backend(captioner, backend)
        n = len(pixels) if self.config.n_images is None else min(self.config.n_images, len(pixels))
        if n < 1:
            raise ClipHeadsError("no images to caption")
        caption_pixels = pixels if caption_pixels is None else caption_pixels
        if len(caption_pixels) != len(pixels):
            raise ClipHeadsError(f"{len(caption_pixels)} images for the captioner but {len(pixels)} for CLIP")
        self.pixels, self.caption_pixels = _first(pixels, n), _first(caption_pixels, n)
        self.n_images = n

    def describe(self) -> dict:
        """The settings, for the results JSON."""
        return {**self.config.to_dict(), "n_images": self.n_images,
                "captioner_encoder": "clip" if self.encoder is self.backend else "own (VisionEncoderDecoderModel)"}

    @torch.no_grad()
    def __call__(self, groups: Sequence[Sequence[int]], selected: Sequence[Sequence[str]] | None = None
                 ) -> list[GroupCaptions]:
        """Captions per group (``[]``: the unmodified model), in the order given.

        Args:
            groups: layers cancelled together, one list per group.
            selected: per group, the caption the model with that group cancelled selected for each image (at least
                ``n_images``); required when ``prefix_from_selection``.
        """
        self.backend.require_unablated("layer-wise captioning")
        self.encoder.require_unablated("layer-wise captioning")
        if selected is not None and len(selected) != len(groups):
            raise ClipHeadsError(f"got selected captions for {len(selected)} groups, but {len(groups)} groups")
        if self.config.prefix_from_selection and selected is None:
            raise ClipHeadsError("prefix_from_selection needs the selected captions (the caption-selection task)")
        size = self.config.batch_size
        vanilla = encode_images(self.backend, _batches(self.pixels, size), size)  # [N, D]: scores every caption
        vanilla_encoder = (vanilla if self.encoder is self.backend
                           else encode_images(self.encoder, _batches(self.caption_pixels, size), size))
        rows = []
        for i, group in enumerate(groups):
            chosen = list(selected[i][:self.n_images]) if selected is not None else []
            if selected is not None and len(chosen) != self.n_images:
                raise ClipHeadsError(f"group {layer_group_label(group)}: {len(chosen)} selected captions for "
                                     f"{self.n_images} images")
            prefixes = None
            if self.config.prefix_from_selection:
                words = self.config.prefix_words
                prefixes = [" ".join(c.split()[:words]) if words else c for c in chosen]
            generated, cosine = self._generate(group, prefixes, vanilla_encoder)
            generated_scores = clip_scores(self.backend, vanilla, generated).tolist()
            selected_scores = clip_scores(self.backend, vanilla, chosen).tolist() if chosen else []
            rows.append(GroupCaptions(layer_group_label(group), generated, generated_scores, chosen, selected_scores,
                                      cosine, prefixes or []))
            log.info("layer-wise captions: %s cancelled, mean CLIP score generated %.2f", rows[-1].layers,
                     rows[-1].mean_generated_clip_score)
        return rows

    def _generate(self, group: Sequence[int], prefixes: list[str] | None,
                  vanilla_encoder: torch.Tensor) -> tuple[list[str], float]:
        """Captions with ``group`` cancelled in the captioner's encoder; that encoder's cosine to the vanilla."""
        config = self.config
        mask = HeadMask.from_layers(list(group), self.encoder) if group else None
        context = ablate(self.encoder, mask, op=config.op, alpha=config.alpha) if mask is not None else nullcontext()
        with context:
            features = encode_images(self.encoder, _batches(self.caption_pixels, config.batch_size),
                                     config.batch_size)  # what the decoder reads
            if isinstance(self.captioner, PrefixCaptioner):
                captions = []
                for start in range(0, len(features), config.batch_size):
                    stop = start + config.batch_size
                    captions += self.captioner.generate_from_embeddings(
                        features[start:stop], None if prefixes is None else prefixes[start:stop],
                        num_beams=config.num_beams, max_new_tokens=config.max_new_tokens)
            else:
                captions = generate_captions(self.captioner, self.encoder, self.caption_pixels, prefixes,
                                             num_beams=config.num_beams, max_new_tokens=config.max_new_tokens,
                                             batch_size=config.batch_size)
        cosine = torch.nn.functional.cosine_similarity(features.float(), vanilla_encoder.float(), dim=-1).mean()
        if mask is not None and torch.equal(features, vanilla_encoder):
            log.warning("cancelling layers %s did not change the captioner's encoder features",
                        layer_group_label(group))
        return captions, float(cosine)


def _first(pixels, n: int):
    """The first ``n`` images of a tensor or of a :class:`~clipheads.search.pixels.PixelStore` (kept as stored)."""
    return pixels.head(n) if hasattr(pixels, "head") else pixels[:n]


def _batches(pixels, size: int):
    """A tensor as it is (the encoder splits it), a pixel store as float batches of ``size`` images."""
    return pixels if isinstance(pixels, torch.Tensor) else pixels.split(size)


def selection_caption_pixels(captioner: Captioner, data, batch_size: int = 64, num_workers: int = 0,
                             skip_bad: bool = False, storage: str = "float32"):
    """The images of a caption-selection ``SearchData`` preprocessed for the captioner's encoder.

    ``None`` for a prefix captioner (it reads the CLIP model's embedding of ``data.pixels``); for an encoder-decoder,
    the images of ``data.source`` read again with its own preprocessing (input size and normalisation): a
    ``[N, 3, H, W]`` tensor, or under a memory budget (``storage`` ``uint8`` or ``disk``) a
    :class:`~clipheads.search.pixels.PixelStore` giving the same floats.
    """
    if isinstance(captioner, PrefixCaptioner):
        return None
    from clipheads.data import load_caption_selection
    from clipheads.search.pixels import load_pixel_store
    from clipheads.search.tasks import load_pixels

    dataset = load_caption_selection(data.source)
    if storage == "float32":
        pixels, _, _ = load_pixels(captioner.backend, dataset.image_paths, batch_size, num_workers, skip_bad)
    else:
        pixels, _, _ = load_pixel_store(captioner.backend, dataset.image_paths, storage, batch_size, num_workers,
                                        skip_bad)
    if len(pixels) != len(data.pixels):
        raise ClipHeadsError(f"{data.source}: read {len(pixels)} images for the captioner but {len(data.pixels)} for "
                             "CLIP")
    return pixels
