"""Pieces shared by the captioners: text prefixes, grouping by prefix length, and putting the caption back together.

Captions are decoded in groups of images whose text prefixes have the same number of tokens, so no sequence is ever
padded: an image's caption does not depend on which other images share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipheads.errors import ClipHeadsError


def normalize_prefixes(prefixes: str | Sequence[str | None] | None, n_images: int) -> list[str]:
    """One text prefix per image (``""`` for none) from ``None``, one string for all, or one per image."""
    if prefixes is None:
        return [""] * n_images
    if isinstance(prefixes, str):
        return [prefixes] * n_images
    prefixes = ["" if p is None else str(p) for p in prefixes]
    if len(prefixes) != n_images:
        raise ClipHeadsError(f"got {len(prefixes)} text prefixes for {n_images} images; give one per image, "
                             "one for all, or none")
    return prefixes


def prefix_token_ids(tokenizer, prefixes: Sequence[str]) -> list[list[int]]:
    """Token ids of each text prefix, without special tokens (``[]`` for an empty prefix)."""
    return [tokenizer(p.strip(), add_special_tokens=False)["input_ids"] if p.strip() else [] for p in prefixes]


def groups_by_length(token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of the sequences grouped by length (groups in order of first appearance)."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(token_ids):
        groups.setdefault(len(ids), []).append(i)
    return list(groups.values())


def start_token_id(tokenizer) -> int:
    """The token a caption starts with: the tokenizer's ``bos`` (GPT-2's is its ``eos``, ``<|endoftext|>``)."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ClipHeadsError(f"the captioner's tokenizer ({type(tokenizer).__name__}) has neither a bos nor an eos "
                             "token; set one (tokenizer.bos_token / eos_token) before training")
    return int(token_id)


def until_eos(ids: torch.Tensor | Sequence[int], eos_token_id: int | None) -> list[int]:
    """Generated ids up to (not including) the first end-of-sequence token."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[:ids.index(eos_token_id)]
    return ids


def join_caption(tokenizer, prefix: str, prefix_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The caption: the user's text prefix, exactly as given, followed by the decoded continuation.

    The continuation is cut out of the decoding of ``prefix_ids + new_ids`` so that the tokenizer decides on the
    space between them (BPE continuations carry it, word-level decoders add it).
    """
    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True)

    prefix = prefix.strip()
    if not prefix:
        return decode(new_ids).strip()
    whole, head = decode([*prefix_ids, *new_ids]), decode(prefix_ids)
    tail = whole[len(head):] if whole.startswith(head) else " " + decode(new_ids)
    return (prefix + tail).rstrip()
