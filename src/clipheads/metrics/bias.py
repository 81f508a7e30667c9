"""Bias of text-to-image retrieval: MaxSkew@K (Geyik et al. 2019; Berg et al. 2022) per attribute.

For a neutral query, rank the images of an attribute, take the top K and compare each value's share there with its
share among all those images: ``skew_v = ln(p_topK(v) / p_all(v))``; ``MaxSkew@K = max_v skew_v``. 0 means no value
is over-represented; the result is averaged over the queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from clipheads.errors import DataError


@dataclass
class BiasResult:
    """``max_skew[attribute]``: MaxSkew@K averaged over queries; ``per_query[attribute]``: one value per query."""

    k: int
    max_skew: dict[str, float]
    per_query: dict[str, list[float]]
    n_images: int
    skipped_images: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        out = {f"max_skew@{self.k}/{a}": v for a, v in self.max_skew.items()}
        return {**out, f"max_skew@{self.k}": sum(self.max_skew.values()) / len(self.max_skew)}

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "k": self.k, "per_query": self.per_query, "n_images": self.n_images,
                "skipped_images": self.skipped_images}


def check_skew_k(k: int, counts: dict[str, int], source: str = "") -> None:
    """Refuse (one-line :class:`DataError`) a MaxSkew K above the number of images of an attribute
    (``counts``: attribute -> images; MaxSkew@K ranks each attribute's images on their own)."""
    attribute, n = min(counts.items(), key=lambda item: item[1])
    if k > n:
        where = f" of attribute {attribute!r}" if attribute else ""
        raise DataError(f"{source + ': ' if source else ''}MaxSkew@{k} ranks the {n} images{where}, fewer than "
                        f"K = {k}; choose K <= {n} (CLI: --skew-k {n})")


def max_skew(scores: torch.Tensor, values: Sequence[str], k: int) -> torch.Tensor:
    """MaxSkew@K of each query: ``scores [Q, N]`` query-image similarities, ``values [N]`` each image's value.

    Returns ``[Q]``.

    Raises:
        DataError: ``k`` outside ``1..N`` (a K above the image count would be a smaller K under K's name).
    """
    if scores.shape[1] != len(values):
        raise DataError(f"{scores.shape[1]} images scored but {len(values)} attribute values")
    if k < 1:
        raise DataError(f"MaxSkew@K needs K >= 1; got {k}")
    check_skew_k(k, {"": len(values)})
    names = sorted(set(values))
    value_ids = torch.tensor([names.index(v) for v in values])
    desired = torch.bincount(value_ids, minlength=len(names)).double() / len(values)  # [V]
    top = value_ids[scores.topk(k, dim=1).indices]  # [Q, k]
    observed = torch.stack([torch.bincount(row, minlength=len(names)) for row in top]).double() / k  # [Q, V]
    return torch.log(observed / desired).max(dim=1).values.float()


def bias_metrics(query_features: torch.Tensor, image_features: torch.Tensor, attributes: Sequence[str],
                 values: Sequence[str], k: int = 10) -> BiasResult:
    """MaxSkew@K per attribute, each over the images that vary that attribute, averaged over the queries.

    Args:
        query_features: ``[Q, D]`` normalised neutral text queries.
        image_features: ``[N, D]`` normalised images; ``attributes[i]``/``values[i]`` describe image i.

    Raises:
        DataError: ``k`` above the image count of an attribute (see :func:`check_skew_k`).
    """
    if not len(attributes) == len(values) == len(image_features):
        raise DataError(f"{len(image_features)} images but {len(attributes)} attributes and {len(values)} values")
    check_skew_k(k, {a: attributes.count(a) for a in set(attributes)})
    scores = query_features.float() @ image_features.float().T  # [Q, N]
    mean, per_query = {}, {}
    for attribute in sorted(set(attributes)):
        columns = [i for i, a in enumerate(attributes) if a == attribute]
        skews = max_skew(scores[:, columns], [values[i] for i in columns], k)
        per_query[attribute] = skews.tolist()
        mean[attribute] = float(skews.mean())
    return BiasResult(k, mean, per_query, len(image_features))
