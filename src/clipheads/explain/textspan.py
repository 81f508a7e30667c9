"""TextSpan (Gandelsman et al., 2024): describe each head by the text directions that span its output variance.

For one head, the contributions ``C`` (``[N, D]``, one row per image, mean-centered over images) vary in a few
directions. Text features (unit norm) are first projected onto the head's top ``rank`` principal directions. Then,
``k`` times: pick the text whose (projected) feature ``t`` maximises the variance of ``C @ t``, and project the
direction of ``t`` out of the contributions and out of every remaining text feature. A text close to an already
chosen one keeps little norm and is not picked again. The variance a pick explains is the variance it removes
from the contributions, as a fraction of the head's total variance.

All heads are processed at once (in chunks) in the ``rank``-dimensional principal coordinates, where the
contributions are summarised by their ``[rank, rank]`` covariance: a step costs ``O(texts * rank^2)`` per head.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipheads.errors import ClipHeadsError, DataError
from clipheads.explain.decomposition import Decomposition
from clipheads.files import write_json_atomic
from clipheads.heads import head_label, parse_head

FORMAT = "clipheads.TextSpan/1"


@dataclass
class HeadDescription:
    """The ``k`` texts that describe one head, in the order TextSpan chose them."""

    layer: int
    head: int
    texts: list[str]
    explained: list[float]  # fraction of the head's variance removed by each text, in order
    variance: float  # total variance of the head's contributions (sum over embedding dimensions)

    @property
    def label(self) -> str:
        return head_label(self.layer, self.head)

    def to_dict(self) -> dict:
        fields = asdict(self)
        del fields["layer"], fields["head"]
        return {"head": self.label, **fields}


@dataclass
class TextSpanResult:
    """Descriptions of every analysed head, plus how they were obtained."""

    heads: list[HeadDescription]
    k: int
    rank: int
    n_images: int
    n_texts: int
    meta: dict = field(default_factory=dict)

    def __getitem__(self, head: str | tuple[int, int]) -> HeadDescription:
        layer, h = parse_head(head)
        for description in self.heads:
            if (description.layer, description.head) == (layer, h):
                return description
        raise KeyError(head_label(layer, h))

    def descriptions(self) -> dict[str, list[str]]:
        """``{"L3.H7": [text, ...]}`` for every head."""
        return {d.label: d.texts for d in self.heads}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "k": self.k, "rank": self.rank, "n_images": self.n_images,
                "n_texts": self.n_texts, "meta": self.meta, "heads": [d.to_dict() for d in self.heads]}

    @classmethod
    def from_dict(cls, data: dict, source: str = "descriptions") -> TextSpanResult:
        try:
            heads = [HeadDescription(*parse_head(h["head"]), list(h["texts"]),
                                     [float(v) for v in h["explained"]], float(h["variance"])) for h in data["heads"]]
            return cls(heads, int(data["k"]), int(data["rank"]), int(data["n_images"]), int(data["n_texts"]),
                       data.get("meta", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: not a clipheads TextSpan result ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | os.PathLike) -> Path:
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextSpanResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"descriptions file {str(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"descriptions file {str(path)!r} is not valid JSON") from None
        return cls.from_dict(data, source=str(path))


@torch.no_grad()
def text_span(contributions: torch.Tensor, text_features: torch.Tensor, k: int = 5, rank: int = 80,
              chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy TextSpan for ``G`` heads at once.

    Args:
        contributions: ``[G, N, D]`` contributions of ``G`` heads over ``N`` images.
        text_features: ``[M, D]`` text features (normalised to unit norm here).
        k: texts to choose per head.
        rank: principal directions of each head that the texts are projected onto (``min(rank, D)``).
        chunk: heads processed together (memory: ``chunk * M * rank`` floats).

    Returns:
        ``indices [G, k]`` (into the texts, in choice order), ``explained [G, k]`` (fraction of each head's
        variance that each pick removes) and ``variance [G]`` (each head's total variance).
    """
    if contributions.dim() != 3 or text_features.dim() != 2 or contributions.shape[-1] != text_features.shape[-1]:
        raise ClipHeadsError(f"text_span needs contributions [G, N, D] and text features [M, D]; got "
                             f"{tuple(contributions.shape)} and {tuple(text_features.shape)}")
    if not 1 <= k <= text_features.shape[0]:
        raise ClipHeadsError(f"k={k} must be between 1 and the number of texts ({text_features.shape[0]})")
    texts = torch.nn.functional.normalize(text_features.double(), dim=-1)
    results = [_text_span_chunk(_covariance(contributions[i:i + chunk].double()), texts, k,
                                min(rank, texts.shape[-1]))
               for i in range(0, contributions.shape[0], chunk)]
    indices, explained, variance = (torch.cat(parts) for parts in zip(*results, strict=True))
    return indices, explained.float(), variance.float()


def _covariance(data: torch.Tensor) -> torch.Tensor:
    """``[G, N, D]`` -> ``[G, D, D]``: each head's covariance over the images (population, divided by N)."""
    data = data - data.mean(dim=1, keepdim=True)
    return data.transpose(1, 2) @ data / data.shape[1]


class HeadMoments:
    """Running mean and covariance of ``G`` heads' contributions, accumulated over image batches (Chan et al.'s
    pairwise update, in float64): TextSpan needs no more, so ``N`` images cost ``G x D x D`` doubles instead of
    ``[N, G, D]`` contributions.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # [G, D]
        self.scatter: torch.Tensor | None = None  # [G, D, D], sum of centered outer products

    def update(self, contributions: torch.Tensor) -> None:
        """Add a batch ``[B, G, D]`` (images first, as :attr:`Decomposition.heads` flattened over layers x heads)."""
        data = contributions.double().transpose(0, 1)  # [G, B, D]
        batch = data.shape[1]
        if batch == 0:
            return
        mean = data.mean(dim=1)
        scatter = _covariance(data) * batch
        if self.mean is None:
            self.n, self.mean, self.scatter = batch, mean, scatter
            return
        delta = mean - self.mean
        total = self.n + batch
        self.scatter = self.scatter + scatter + delta.unsqueeze(2) * delta.unsqueeze(1) * (self.n * batch / total)
        self.mean = self.mean + delta * (batch / total)
        self.n = total

    def covariance(self) -> torch.Tensor:
        """``[G, D, D]`` population covariance of each head's contributions."""
        if self.scatter is None:
            raise ClipHeadsError("no images were accumulated")
        return self.scatter / self.n


def text_span_moments(moments: HeadMoments, text_features: torch.Tensor, k: int = 5, rank: int = 80,
                      chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`text_span` from accumulated :class:`HeadMoments` (same returns, same algorithm)."""
    if not 1 <= k <= text_features.shape[0]:
        raise ClipHeadsError(f"k={k} must be between 1 and the number of texts ({text_features.shape[0]})")
    texts = torch.nn.functional.normalize(text_features.double(), dim=-1)
    covariance = moments.covariance()
    results = [_text_span_chunk(covariance[i:i + chunk], texts, k, min(rank, texts.shape[-1]))
               for i in range(0, covariance.shape[0], chunk)]
    indices, explained, variance = (torch.cat(parts) for parts in zip(*results, strict=True))
    return indices, explained.float(), variance.float()


def _text_span_chunk(covariance: torch.Tensor, texts: torch.Tensor, k: int, rank: int):
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    basis = eigenvectors[..., -rank:]  # [G, D, r]
    total = covariance.diagonal(dim1=1, dim2=2).sum(-1)  # [G]
    cov_r = torch.diag_embed(eigenvalues[..., -rank:].clamp(min=0))  # covariance in principal coordinates
    texts_r = torch.einsum("md,gdr->gmr", texts, basis)  # texts projected onto each head's principal span
    heads = torch.arange(covariance.shape[0])
    indices = torch.zeros(covariance.shape[0], k, dtype=torch.long)
    explained = torch.zeros(covariance.shape[0], k, dtype=covariance.dtype)
    for step in range(k):
        variance = torch.einsum("gmr,grs,gms->gm", texts_r, cov_r, texts_r)  # variance of C @ t per text
        pick = variance.argmax(dim=-1)
        u = texts_r[heads, pick]  # [G, r]
        norm2 = (u * u).sum(-1, keepdim=True).clamp(min=1e-30)
        explained[:, step] = variance[heads, pick] / norm2.squeeze(-1) / total.clamp(min=1e-30)
        indices[:, step] = pick
        # project the chosen direction out of the contributions' covariance and out of every text
        cu = torch.einsum("grs,gs->gr", cov_r, u) / norm2
        ucu = (u * cu).sum(-1, keepdim=True) / norm2
        cov_r = (cov_r - cu.unsqueeze(2) * u.unsqueeze(1) - u.unsqueeze(2) * cu.unsqueeze(1)
                 + ucu.unsqueeze(2) * u.unsqueeze(2) * u.unsqueeze(1))
        texts_r = texts_r - (texts_r @ u.unsqueeze(-1)) / norm2.unsqueeze(1) * u.unsqueeze(1)
    return indices, explained, total


def describe_heads(decomposition: Decomposition, text_features: torch.Tensor, texts: Sequence[str], k: int = 5,
                   rank: int = 80, meta: dict | None = None) -> TextSpanResult:
    """Run TextSpan on every head of a :class:`Decomposition`.

    Args:
        decomposition: head terms ``[N, S, H, D]`` of ``N`` images.
        text_features: ``[M, D]`` features of ``texts`` from the same model's text tower.
        texts: the ``M`` texts of the pool.
    """
    if len(texts) != text_features.shape[0]:
        raise ClipHeadsError(f"{len(texts)} texts but {text_features.shape[0]} text features")
    n_images, n_layers, n_heads, dim = decomposition.heads.shape
    if n_images < 2:
        raise ClipHeadsError("TextSpan needs at least 2 images (it explains the variance across images)")
    per_head = decomposition.heads.permute(1, 2, 0, 3).reshape(n_layers * n_heads, n_images, dim)
    indices, explained, variance = text_span(per_head, text_features.cpu(), k=k, rank=rank)
    return _result(decomposition.layers, n_heads, texts, indices, explained, variance, k, min(rank, dim), n_images,
                   meta)


def describe_moments(moments: HeadMoments, layers: Sequence[int], n_heads: int, text_features: torch.Tensor,
                     texts: Sequence[str], k: int = 5, rank: int = 80, meta: dict | None = None) -> TextSpanResult:
    """:func:`describe_heads` from :class:`HeadMoments` of the heads of ``layers`` (layer-major, ``n_heads`` each)
    accumulated over image batches: the same result without holding every image's contributions."""
    if len(texts) != text_features.shape[0]:
        raise ClipHeadsError(f"{len(texts)} texts but {text_features.shape[0]} text features")
    if moments.n < 2:
        raise ClipHeadsError("TextSpan needs at least 2 images (it explains the variance across images)")
    indices, explained, variance = text_span_moments(moments, text_features.cpu(), k=k, rank=rank)
    return _result(list(layers), n_heads, texts, indices, explained, variance, k,
                   min(rank, moments.mean.shape[-1]), moments.n, meta)


def _result(layers: Sequence[int], n_heads: int, texts: Sequence[str], indices: torch.Tensor,
            explained: torch.Tensor, variance: torch.Tensor, k: int, rank: int, n_images: int,
            meta: dict | None) -> TextSpanResult:
    heads = []
    for i, layer in enumerate(layers):
        for h in range(n_heads):
            g = i * n_heads + h
            heads.append(HeadDescription(layer, h, [texts[j] for j in indices[g].tolist()],
                                         [round(v, 6) for v in explained[g].tolist()], float(variance[g])))
    return TextSpanResult(heads, k, rank, n_images, len(texts), meta or {})
