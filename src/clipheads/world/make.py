"""Writing a bundled world to disk in the shared dataset formats, deterministically from a seed.

Every image is drawn from its own random stream ``(seed, stream, index)``, so the first ``n`` images of a split
are the same whatever the other sizes are: a small world is a prefix of a large one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clipheads.errors import DataError
from clipheads.files import write_bytes_atomic, write_json_atomic
from clipheads.world.grammar import NEUTRAL_QUERIES, object_phrase, positional_caption, scene_captions
from clipheads.world.scene import (
    COLOURS,
    MARKER_COLOURS,
    P_CUE_MATCH_TRAIN,
    SHAPE_CUE,
    SHAPES,
    SIZES,
    Scene,
    render_scene,
    sample_scene,
)

logger = logging.getLogger(__name__)

WORLD_VERSION = 1
# split name -> how its marker colour is drawn (see scene.sample_marker)
SPLITS = {"train": "train", "val_ood": "random", "test_ood": "random", "test_iid": "train", "test_anti": "anti"}
HELD_OUT = ("val_ood", "test_ood", "test_iid", "test_anti")
# random stream ids: one per split and per extra task, so that each is independent of the others' sizes
_STREAMS = {"train": 0, "val_ood": 1, "test_ood": 2, "test_iid": 3, "test_anti": 4, "compositional": 10,
            "counterfactual": 11, "selection": 12}
TEMPLATES = ("a {}", "a small {}", "a large {}")
RETRIEVAL_FILE = "retrieval.json"


@dataclass
class WorldSizes:
    """How many images (or pairs, or groups) to write. ``train=0`` writes no training split."""

    train: int = 20000
    val_ood: int = 1000
    test_ood: int = 1000
    test_iid: int = 1000
    test_anti: int = 1000
    compositional: int = 200  # image pairs with swapped colour bindings
    counterfactual: int = 100  # groups per counterfactual attribute

    def __post_init__(self) -> None:
        negative = {name: value for name, value in asdict(self).items() if value < 0}
        if negative:
            raise DataError(f"world sizes cannot be negative: {', '.join(f'{k}={v}' for k, v in negative.items())}")

    def to_dict(self) -> dict:
        return asdict(self)

    def split_size(self, split: str) -> int:
        return int(getattr(self, split))


@dataclass
class WorldPaths:
    """Where :func:`make_world` wrote each dataset (all paths absolute; JSON paths inside are relative)."""

    root: Path
    retrieval: Path  # Karpathy-style JSON, every split, with per-image ground truth under "scene"
    classification: dict[str, Path] = field(default_factory=dict)  # split -> ImageFolder of the first shape
    templates: Path | None = None  # zero-shot prompt templates, one per line
    selection: dict[str, Path] = field(default_factory=dict)  # split -> caption-selection JSON
    compositional: Path | None = None
    counterfactual: dict[str, Path] = field(default_factory=dict)  # attribute -> counterfactual JSON
    manifest: Path | None = None

    def to_dict(self, relative: bool = False) -> dict:
        """Paths as strings; ``relative=True`` writes them relative to ``root`` (and leaves ``root`` out)."""

        def text(path: Path) -> str:
            return str(path.relative_to(self.root)) if relative else str(path)

        out: dict = {}
        for name, value in asdict(self).items():
            if isinstance(value, dict):
                out[name] = {key: text(path) for key, path in value.items()}
            elif isinstance(value, Path) and not (relative and name == "root"):
                out[name] = text(value)
            elif value is None:
                out[name] = None
        return out


def scene_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The random stream of one image of one split (or task)."""
    return np.random.default_rng([seed, _STREAMS[stream], index])


def generate_split(split: str, n: int, seed: int = 0) -> Iterator[tuple[Scene, list[str]]]:
    """The first ``n`` scenes of ``split`` with their captions, without touching the disk."""
    if split not in SPLITS:
        raise DataError(f"unknown world split {split!r}; choose one of {', '.join(SPLITS)}")
    for i in range(n):
        rng = scene_rng(seed, split, i)
        scene = sample_scene(rng, SPLITS[split])
        yield scene, scene_captions(scene, rng)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _write_png(path: Path, image: Image.Image) -> bytes:
    payload = png_bytes(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return payload


def _write_splits(root: Path, sizes: WorldSizes, seed: int, progress: bool) -> tuple[list[dict], dict[str, list]]:
    from tqdm.auto import tqdm

    entries: list[dict] = []
    held_out: dict[str, list] = {}
    total = sum(sizes.split_size(s) for s in SPLITS)
    bar = tqdm(total=total, desc="rendering world", unit="img", disable=not progress)
    for split in SPLITS:
        records = []
        for i, (scene, captions) in enumerate(generate_split(split, sizes.split_size(split), seed)):
            name = f"{split}_{i:05d}.png"
            payload = _write_png(root / "images" / split / name, render_scene(scene))
            entries.append({"filename": name, "filepath": f"images/{split}", "split": split, "imgid": len(entries),
                            "sentences": [{"raw": c} for c in captions], "scene": scene.metadata()})
            if split in HELD_OUT:
                records.append((name, scene, payload))
            bar.update()
        held_out[split] = records
    bar.close()
    return entries, held_out


def _write_classification(root: Path, split: str, records: list) -> Path:
    folder = root / "classification" / split
    for name, scene, payload in records:
        path = folder / scene.first.shape / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return folder


def _selection_items(split: str, records: list, seed: int) -> list[dict]:
    """Caption selection: the true caption among hard negatives that change one thing.

    Negatives: the first object's shape (the shape the marker signals when it does not match, so that a model
    following the cue picks it), the first object's colour, swapped colours of two objects (binding), the first
    object's size.
    """
    items = []
    for i, (name, scene, _) in enumerate(records):
        rng = scene_rng(seed, "selection", _STREAMS[split] * 1_000_000 + i)
        first = scene.first
        shape = scene.cue_shape if not scene.cue_matches else _other(rng, SHAPES, first.shape)
        negatives = [scene.with_objects((first.replace(shape=shape), *scene.objects[1:])),
                     scene.with_objects((first.replace(colour=_other(rng, tuple(COLOURS), first.colour)),
                                         *scene.objects[1:])),
                     scene.with_objects((first.replace(size=_other(rng, tuple(SIZES), first.size)),
                                         *scene.objects[1:]))]
        if len(scene.objects) > 1 and scene.objects[1].colour != first.colour:
            second = scene.objects[1]
            negatives.append(scene.with_objects((first.replace(colour=second.colour),
                                                 second.replace(colour=first.colour))))
        candidates = [positional_caption(scene)] + [positional_caption(s) for s in negatives]
        order = rng.permutation(len(candidates)).tolist()
        kinds = ["shape", "colour", "size", "binding"][:len(negatives)]
        items.append({"image": f"images/{split}/{name}", "candidates": [candidates[j] for j in order],
                      "answer": order.index(0), "negative_kinds": kinds,
                      "cue_shape": scene.cue_shape, "first_shape": first.shape})
    return items


def _other(rng: np.random.Generator, values: tuple[str, ...], current: str) -> str:
    options = [v for v in values if v != current]
    return options[int(rng.integers(len(options)))]


def _write_compositional(root: Path, n_pairs: int, seed: int) -> list[dict]:
    """Pairs of scenes with two objects of different colours, identical but for swapped colour bindings."""
    pairs = []
    for i in range(n_pairs):
        rng = scene_rng(seed, "compositional", i)
        while True:
            scene = sample_scene(rng, "random", p_two_objects=1.0)
            a, b = scene.objects
            if a.colour != b.colour:
                break
        swapped = scene.with_objects((a.replace(colour=b.colour), b.replace(colour=a.colour)))
        names = [f"images/compositional/pair{i:04d}_{k}.png" for k in "ab"]
        for name, s in zip(names, (scene, swapped), strict=True):
            _write_png(root / name, render_scene(s))
        pairs.append({"images": names, "captions": [positional_caption(scene), positional_caption(swapped)]})
    return pairs


def _write_counterfactual(root: Path, attribute: str, n_groups: int, seed: int) -> dict:
    """Groups of one scene drawn with every value of ``attribute``: ``cue`` (the marker colour, which captions never
    mention) or ``colour`` (of the first object). Queries are neutral: they name sizes and shapes only."""
    images = []
    for g in range(n_groups):
        rng = scene_rng(seed, "counterfactual", g if attribute == "cue" else 1_000_000 + g)
        scene = sample_scene(rng, "random")
        if attribute == "cue":
            variants = {m: scene.with_marker(m) for m in MARKER_COLOURS}
        else:
            variants = {c: scene.with_objects((scene.first.replace(colour=c), *scene.objects[1:])) for c in COLOURS}
        for value, variant in variants.items():
            name = f"images/counterfactual/{attribute}_g{g:04d}_{value}.png"
            _write_png(root / name, render_scene(variant))
            images.append({"image": name, "group": f"{attribute}{g:04d}", "attribute": attribute, "value": value,
                           "first_shape": variant.first.shape, "cue_shape": variant.cue_shape,
                           "description": object_phrase(variant.first)})
    return {"queries": list(NEUTRAL_QUERIES), "images": images}


_WORLD_ENTRY = re.compile(r"images|classification|retrieval\.json|selection_\w+\.json|compositional\.json|"
                          r"counterfactual_\w+\.json|templates\.txt|world\.json|\..+\.tmp")


def _clear_earlier_world(root: Path) -> None:
    """Remove an earlier (possibly interrupted) world from ``root``: a smaller world written over a larger one would
    otherwise leave stale images in the ImageFolder classes and stale dataset files of splits it does not have. A
    folder holding anything else is refused."""
    if not root.is_dir():
        return
    entries = list(root.iterdir())
    others = sorted(entry.name for entry in entries if not _WORLD_ENTRY.fullmatch(entry.name))
    if others:
        raise DataError(f"{str(root)!r} holds files that are not a clipheads world ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); write the world to a new or empty folder")
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def make_world(out_dir: str | Path, seed: int = 0, sizes: WorldSizes | None = None,
               progress: bool = True) -> WorldPaths:
    """Render a world and write every dataset of it under ``out_dir``.

    Args:
        out_dir: folder to write (created; an earlier world there is replaced, a folder with other files refused).
        seed: the world's seed; the same seed gives byte-identical files.
        sizes: images per split and pairs/groups per task (default :class:`WorldSizes`).
        progress: show a tqdm progress bar.

    Returns:
        :class:`WorldPaths` of everything written.
    """
    sizes = sizes or WorldSizes()
    root = Path(out_dir).resolve()
    _clear_earlier_world(root)
    root.mkdir(parents=True, exist_ok=True)
    entries, held_out = _write_splits(root, sizes, seed, progress)
    paths = WorldPaths(root=root, retrieval=root / RETRIEVAL_FILE)
    write_json_atomic(paths.retrieval, {"dataset": "clipheads-world", "seed": seed, "images": entries})
    for split, records in held_out.items():
        if records:
            paths.classification[split] = _write_classification(root, split, records)
            paths.selection[split] = root / f"selection_{split}.json"
            write_json_atomic(paths.selection[split], _selection_items(split, records, seed))
    paths.templates = root / "templates.txt"
    write_bytes_atomic(paths.templates, ("\n".join(TEMPLATES) + "\n").encode())
    if sizes.compositional:
        paths.compositional = root / "compositional.json"
        write_json_atomic(paths.compositional, _write_compositional(root, sizes.compositional, seed))
    for attribute in ("cue", "colour") if sizes.counterfactual else ():
        paths.counterfactual[attribute] = root / f"counterfactual_{attribute}.json"
        write_json_atomic(paths.counterfactual[attribute], _write_counterfactual(root, attribute,
                                                                                 sizes.counterfactual, seed))
    paths.manifest = root / "world.json"
    write_json_atomic(paths.manifest, {
        "world_version": WORLD_VERSION, "seed": seed, "sizes": sizes.to_dict(), "splits": SPLITS,
        "cue": {"kind": "8x8 marker in the top-left corner", "p_match_train": P_CUE_MATCH_TRAIN,
                "marker_for_shape": SHAPE_CUE},
        "paths": paths.to_dict(relative=True),
        "retrieval_sha256": hashlib.sha256(paths.retrieval.read_bytes()).hexdigest()})
    logger.info("wrote a world of %d images to %s", len(entries), root)
    return paths


def read_split(retrieval_json: str | Path, split: str) -> list[dict]:
    """Entries of one split of a world's Karpathy JSON, with ``path`` (absolute) added to each."""
    retrieval_json = Path(retrieval_json)
    if retrieval_json.is_dir():
        retrieval_json = retrieval_json / RETRIEVAL_FILE
    if not retrieval_json.exists():
        raise DataError(f"{retrieval_json} not found: write a world first with `clipheads world make --out DIR`")
    import json

    try:
        data = json.loads(retrieval_json.read_text())
        images = data["images"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{retrieval_json} is not a Karpathy-style JSON with an 'images' list ({exc})") from None
    entries = [dict(e) for e in images if e.get("split") == split]
    for entry in entries:
        entry["path"] = str(retrieval_json.parent / entry.get("filepath", "") / entry["filename"])
    return entries
