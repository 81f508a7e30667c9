"""TextSpan (Gandelsman et al., 2024): describe each head by the text directions that span its output variance.

As published (clip_text_span ``compute_complete_text_set.py``, ``replace_with_iterative_removal``): for one head,
the contributions ``C`` (``[N, D]``, one row per image) are factored by an SVD of the *uncentred* ``C``, and the
text features (unit norm) are projected onto its top ``rank`` right singular vectors. ``C`` is then centred over
the images, and ``k`` times: pick the text whose (projected) feature ``t`` maximises the variance of ``C @ t``, and
project the direction of ``t`` out of the contributions and out of every remaining text feature. A text close to an
already chosen one keeps little norm and is not picked again. The variance a pick explains is the variance it
removes from the contributions, as a fraction of the head's total variance.

Stability: ``rank`` is clamped to each head's numerical rank (see :func:`effective_ranks`; a head's terms span at
most ``head_dim + 3`` directions), because right singular vectors past it are rounding noise: projecting the texts
onto them made picks 2..k depend on the number of threads. The SVD, the projections and the greedy steps run in
float64 on the CPU; scores within ``1e-9`` of the head's first best score count as tied and a tie goes to the first
text in the pool, and a text is never picked twice. Picks after a head's variance is used up (``k`` above its rank)
explain 0 and are then the first unpicked texts of the pool: the same on every thread count and device.

All heads are processed at once (in chunks) in the ``rank``-dimensional singular coordinates, where the centred
contributions are summarised by their ``[rank, rank]`` covariance: a step costs ``O(texts * rank^2)`` per head.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
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
    rank: int | None = None  # singular directions the texts were projected onto (the clamped rank)

    @property
    def label(self) -> str:
        return head_label(self.layer, self.head)

    def to_dict(self) -> dict:
        fields = asdict(self)
        del fields["layer"], fields["head"]
        if self.rank is None:
            del fields["rank"]
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

    def select(self, k: int | None = None, layers: list[int] | None = None) -> TextSpanResult:
        """The first ``k`` texts of each head (TextSpan picks greedily, so they are what a run with ``k`` picks) and
        only the heads of ``layers`` (``None``: keep all).

        Raises:
            DataError: ``k`` is more than the result has, or no head is in ``layers``.
        """
        if k is not None and k > self.k:
            raise DataError(f"these descriptions have {self.k} texts per head, fewer than k={k}: describe the heads "
                            f"again with --k {k} (or use k <= {self.k})")
        k = self.k if k is None else k
        heads = [replace(d, texts=d.texts[:k], explained=d.explained[:k]) for d in self.heads
                 if layers is None or d.layer in layers]
        if not heads:
            raise DataError(f"these descriptions have no head in layers {layers}")
        return replace(self, heads=heads, k=k)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "k": self.k, "rank": self.rank, "n_images": self.n_images,
                "n_texts": self.n_texts, "meta": self.meta, "heads": [d.to_dict() for d in self.heads]}

    @classmethod
    def from_dict(cls, data: dict, source: str = "descriptions") -> TextSpanResult:
        try:
            heads = [HeadDescription(*parse_head(h["head"]), list(h["texts"]),
                                     [float(v) for v in h["explained"]], float(h["variance"]),
                                     None if h.get("rank") is None else int(h["rank"])) for h in data["heads"]]
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


def text_span(contributions: torch.Tensor, text_features: torch.Tensor, k: int = 5, rank: int = 80,
              chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy TextSpan for ``G`` heads at once.

    Args:
        contributions: ``[G, N, D]`` contributions of ``G`` heads over ``N`` images.
        text_features: ``[M, D]`` text features (normalised to unit norm here).
        k: texts to choose per head.
        rank: right singular vectors of each head's (uncentred) contributions that the texts are projected onto,
            clamped to the head's numerical rank (see :func:`effective_ranks`).
        chunk: heads processed together (memory: ``chunk * M * rank`` float64).

    Returns:
        ``indices [G, k]`` (into the texts, in choice order), ``explained [G, k]`` (fraction of each head's
        variance that each pick removes) and ``variance [G]`` (each head's total variance).

    Raises:
        ClipHeadsError: shapes that do not fit, ``k`` outside ``1..M`` or ``rank < 1``.
    """
    return _text_span(contributions, text_features, k, rank, chunk)[:3]


@torch.no_grad()
def _text_span(contributions: torch.Tensor, text_features: torch.Tensor, k: int, rank: int, chunk: int = 16):
    """:func:`text_span`, plus ``[G]`` the rank each head used."""
    if contributions.dim() != 3 or text_features.dim() != 2 or contributions.shape[-1] != text_features.shape[-1]:
        raise ClipHeadsError(f"text_span needs contributions [G, N, D] and text features [M, D]; got "
                             f"{tuple(contributions.shape)} and {tuple(text_features.shape)}")
    if not 1 <= k <= text_features.shape[0]:
        raise ClipHeadsError(f"k={k} must be between 1 and the number of texts ({text_features.shape[0]})")
    if rank < 1:
        raise ClipHeadsError(f"rank={rank} must be at least 1")
    texts = torch.nn.functional.normalize(text_features.detach().cpu().double(), dim=-1)
    data = contributions.detach().cpu()
    results = [_text_span_chunk(data[i:i + chunk].double(), texts, k, rank)
               for i in range(0, data.shape[0], chunk)]
    indices, explained, variance, ranks = (torch.cat(parts) for parts in zip(*results, strict=True))
    return indices, explained.float(), variance.float(), ranks


NOISE_FACTOR = 2.0  # rounding-noise level of float32 head terms, in units of eps(float32) * ||C||_F (see below)


def effective_ranks(singular_values: torch.Tensor, rank: int) -> torch.Tensor:
    """``[G]`` ranks used per head: ``rank`` clamped to the numerical rank of each ``[N, D]`` contribution matrix.

    ``singular_values``: ``[G, min(N, D)]`` descending. A singular value counts when it exceeds
    ``2 * eps(float32) * ||C||_F``: the float32 rounding of the terms is a noise matrix of Frobenius norm about
    ``eps * ||C||_F``, none of whose singular values exceed that. (``torch.linalg.matrix_rank``'s default,
    ``max(N, D) * eps * s_max``, cuts real directions of heads whose mean output dominates.) On the bundled model the
    kept singular values were at least 12.6 and the dropped ones at most 0.49 of ``eps * ||C||_F`` (2026-11-29).
    """
    frobenius = singular_values.square().sum(dim=-1, keepdim=True).sqrt()
    tolerance = NOISE_FACTOR * torch.finfo(torch.float32).eps * frobenius
    numerical = (singular_values > tolerance).sum(dim=-1)
    return numerical.clamp(min=1, max=rank)


def _basis(singular: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G]`` clamped ranks and ``[G, D, r]`` the top right singular vectors of each head (zero past its rank)."""
    ranks = effective_ranks(singular, rank)  # [G]
    width = int(ranks.max())
    keep = (torch.arange(width) < ranks.unsqueeze(1)).to(vh.dtype)  # [G, r]: the columns each head uses
    return ranks, vh[:, :width].transpose(1, 2) * keep.unsqueeze(1)  # orthonormal columns (or zero)


def _text_span_chunk(data: torch.Tensor, texts: torch.Tensor, k: int, rank: int):
    n_images = data.shape[1]
    _, singular, vh = torch.linalg.svd(data, full_matrices=False)  # of the uncentred contributions, as published
    ranks, basis = _basis(singular, vh, rank)
    data = data - data.mean(dim=1, keepdim=True)
    total = (data * data).sum(dim=(1, 2)) / n_images  # [G]
    coordinates = data @ basis  # [G, N, r]
    cov_r = coordinates.transpose(1, 2) @ coordinates / n_images  # covariance in the singular coordinates
    return (*_greedy(texts, basis, cov_r, total, k), total, ranks)


def _text_span_moments_chunk(gram: torch.Tensor, sums: torch.Tensor, n_images: int, texts: torch.Tensor, k: int,
                             rank: int):
    """:func:`_text_span_chunk` from the uncentred second moments ``gram = C^T C`` (``[G, D, D]``) and the sums
    ``C^T 1`` (``[G, D]``) of ``n_images`` rows: the right singular vectors of ``C`` are the eigenvectors of
    ``C^T C`` (its singular values the square roots of the eigenvalues), and the centred covariance is
    ``C^T C / N - mean mean^T``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    singular = eigenvalues.flip(-1).clamp(min=0).sqrt()  # [G, D], descending
    vh = eigenvectors.flip(-1).transpose(1, 2)  # rows: right singular vectors, in the order of ``singular``
    ranks, basis = _basis(singular, vh, rank)
    mean = sums / n_images  # [G, D]
    second = gram / n_images - mean.unsqueeze(2) * mean.unsqueeze(1)  # centred covariance [G, D, D]
    total = second.diagonal(dim1=1, dim2=2).sum(-1)  # [G]
    cov_r = basis.transpose(1, 2) @ second @ basis
    return (*_greedy(texts, basis, cov_r, total, k), total, ranks)


def _greedy(texts: torch.Tensor, basis: torch.Tensor, cov_r: torch.Tensor, total: torch.Tensor, k: int):
    """The ``k`` greedy picks and the variance fraction each explains, from the texts ``[M, D]``, each head's basis
    ``[G, D, r]`` and its centred covariance in that basis ``[G, r, r]``."""
    texts_r = torch.einsum("md,gdr->gmr", texts, basis)  # texts projected onto each head's top singular span
    heads = torch.arange(cov_r.shape[0])
    indices = torch.zeros(cov_r.shape[0], k, dtype=torch.long)
    explained = torch.zeros(cov_r.shape[0], k, dtype=cov_r.dtype)
    picked = torch.zeros(texts_r.shape[:2], dtype=torch.bool)
    quantum = None
    for step in range(k):
        variance = torch.einsum("gmr,grs,gms->gm", texts_r, cov_r, texts_r)  # variance of C @ t per text
        if quantum is None:  # scores closer than 1e-9 of the first best are ties: the first text wins
            quantum = (variance.max(dim=-1, keepdim=True).values * 1e-9).clamp(min=1e-300)
        keyed = torch.round(variance / quantum).masked_fill(picked, -torch.inf)
        pick = keyed.argmax(dim=-1)  # the first of the maximal values
        picked[heads, pick] = True
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
    return indices, explained


class HeadMoments:
    """The uncentred second moments of ``G`` heads' contributions, accumulated over image chunks in float64: what
    streamed TextSpan needs instead of the contributions of every image (``[G, D, D] + [G, D]`` float64, whatever
    ``N``).

    Attributes:
        gram: ``[G, D, D]`` ``sum_i c_i c_i^T`` (``C^T C``). sums: ``[G, D]`` ``sum_i c_i``. n_images: rows added.
        layers: the layers of the heads (``G = len(layers) x H``, layer-major as in :func:`describe_heads`).
    """

    def __init__(self, layers: Sequence[int], n_heads: int, dim: int) -> None:
        self.layers, self.n_heads = list(layers), n_heads
        groups = len(self.layers) * n_heads
        self.gram = torch.zeros(groups, dim, dim, dtype=torch.float64)
        self.sums = torch.zeros(groups, dim, dtype=torch.float64)
        self.n_images = 0
        self.convention = "textspan"

    @property
    def nbytes(self) -> int:
        return (self.gram.numel() + self.sums.numel()) * 8

    @staticmethod
    def bytes_for(n_head_terms: int, dim: int) -> int:
        """Bytes of the moments of ``n_head_terms`` heads in ``dim`` dimensions."""
        return n_head_terms * (dim * dim + dim) * 8

    @torch.no_grad()
    def add(self, decomposition: Decomposition) -> None:
        """Fold in the head terms ``[b, S, H, D]`` of one chunk of images."""
        if decomposition.layers != self.layers:
            raise ClipHeadsError(f"a chunk of layers {decomposition.layers}, expected {self.layers}")
        b, n_layers, n_heads, dim = decomposition.heads.shape
        chunk = decomposition.heads.detach().cpu().double().permute(1, 2, 0, 3).reshape(n_layers * n_heads, b, dim)
        self.gram += chunk.transpose(1, 2) @ chunk
        self.sums += chunk.sum(dim=1)
        self.n_images += b
        self.convention = decomposition.convention


def describe_heads_streamed(moments: HeadMoments, text_features: torch.Tensor, texts: Sequence[str], k: int = 5,
                            rank: int = 80, meta: dict | None = None, chunk: int = 16) -> TextSpanResult:
    """:func:`describe_heads` from :class:`HeadMoments` (the contributions streamed over image chunks): the same
    picks; the variances and fractions equal the in-memory ones to float64 rounding (the singular vectors come from
    an eigendecomposition of ``C^T C`` instead of an SVD of ``C``)."""
    if len(texts) != text_features.shape[0]:
        raise ClipHeadsError(f"{len(texts)} texts but {text_features.shape[0]} text features")
    if moments.n_images < 2:
        raise ClipHeadsError("TextSpan needs at least 2 images (it explains the variance across images)")
    _check_k_rank(k, rank, text_features)
    features = torch.nn.functional.normalize(text_features.detach().cpu().double(), dim=-1)
    if features.shape[-1] != moments.gram.shape[-1]:
        raise ClipHeadsError(f"text features of {features.shape[-1]} dimensions for head terms of "
                             f"{moments.gram.shape[-1]}")
    results = [_text_span_moments_chunk(moments.gram[i:i + chunk], moments.sums[i:i + chunk], moments.n_images,
                                        features, k, rank) for i in range(0, moments.gram.shape[0], chunk)]
    indices, explained, variance, ranks = (torch.cat(parts) for parts in zip(*results, strict=True))
    return _result(moments.layers, moments.n_heads, moments.n_images, moments.convention, texts, indices,
                   explained.float(), variance.float(), ranks, k, rank, meta)


def _check_k_rank(k: int, rank: int, text_features: torch.Tensor) -> None:
    if not 1 <= k <= text_features.shape[0]:
        raise ClipHeadsError(f"k={k} must be between 1 and the number of texts ({text_features.shape[0]})")
    if rank < 1:
        raise ClipHeadsError(f"rank={rank} must be at least 1")


def _result(layers: Sequence[int], n_heads: int, n_images: int, convention: str, texts: Sequence[str],
            indices: torch.Tensor, explained: torch.Tensor, variance: torch.Tensor, ranks: torch.Tensor, k: int,
            rank: int, meta: dict | None) -> TextSpanResult:
    heads = []
    for i, layer in enumerate(layers):
        for h in range(n_heads):
            g = i * n_heads + h
            heads.append(HeadDescription(layer, h, [texts[j] for j in indices[g].tolist()],
                                         [round(v, 6) for v in explained[g].tolist()], float(variance[g]),
                                         int(ranks[g])))
    meta = {"convention": convention, **(meta or {})}
    return TextSpanResult(heads, k, rank, n_images, len(texts), meta)


def describe_heads(decomposition: Decomposition, text_features: torch.Tensor, texts: Sequence[str], k: int = 5,
                   rank: int = 80, meta: dict | None = None) -> TextSpanResult:
    """Run TextSpan on every head of a :class:`Decomposition`.

    Args:
        decomposition: head terms ``[N, S, H, D]`` of ``N`` images.
        text_features: ``[M, D]`` features of ``texts`` from the same model's text tower.
        texts: the ``M`` texts of the pool.
        k: texts per head. rank: the largest rank of the text projection (clamped per head, see
            :func:`text_span`; each head's rank is in :attr:`HeadDescription.rank`).
    """
    if len(texts) != text_features.shape[0]:
        raise ClipHeadsError(f"{len(texts)} texts but {text_features.shape[0]} text features")
    n_images, n_layers, n_heads, dim = decomposition.heads.shape
    if n_images < 2:
        raise ClipHeadsError("TextSpan needs at least 2 images (it explains the variance across images)")
    per_head = decomposition.heads.permute(1, 2, 0, 3).reshape(n_layers * n_heads, n_images, dim)
    indices, explained, variance, ranks = _text_span(per_head, text_features.cpu(), k=k, rank=rank)
    return _result(decomposition.layers, n_heads, n_images, decomposition.convention, texts, indices, explained,
                   variance, ranks, k, rank, meta)
