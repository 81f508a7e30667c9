"""The demo's evaluation sets: world splits as preprocessed pixels with their captions, encoded once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from clipheads.models import CLIPBackend
from clipheads.world import read_split


@dataclass
class RetrievalSet:
    """One split, ready to score: ``pixels [N, 3, H, W]``, captions flat with ``text_to_image [M]``, text features
    ``[M, D]`` (normalised, computed once) and per-image ground truth of the world (first shape, cue shape)."""

    split: str
    pixels: torch.Tensor
    captions: list[str]
    text_to_image: torch.Tensor
    text_features: torch.Tensor
    first_shapes: list[str]
    cue_shapes: list[str]

    def __len__(self) -> int:
        return len(self.pixels)


@torch.inference_mode()
def load_retrieval_set(backend: CLIPBackend, retrieval_json: str | Path, split: str, limit: int | None = None,
                       captions_per_image: int = 1) -> RetrievalSet:
    """Read ``split`` of a world's Karpathy JSON, preprocess its images and encode its captions once."""
    entries = read_split(retrieval_json, split)[:limit]
    pixels, captions, text_to_image = [], [], []
    for index, entry in enumerate(entries):
        with Image.open(entry["path"]) as image:
            pixels.append(backend.preprocess(image))
        for sentence in entry["sentences"][:captions_per_image]:
            captions.append(sentence["raw"])
            text_to_image.append(index)
    text_features = torch.cat([backend.encode_text(captions[i:i + 512], normalize=True).float()
                               for i in range(0, len(captions), 512)])
    return RetrievalSet(split, torch.stack(pixels), captions, torch.tensor(text_to_image), text_features.cpu(),
                        [e["scene"]["first_shape"] for e in entries], [e["scene"]["cue_shape"] for e in entries])
