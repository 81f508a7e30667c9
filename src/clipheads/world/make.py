"""Writing a bundled world to disk in the shared dataset formats, deterministically from a seed.

Every image is drawn from its own random stream ``(seed, stream, index)``, so the first ``n`` images of a split
are the same whatever the other sizes are: a small world is a prefix of a large one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Iterator
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


def _write_splits(root: Path, scenes: dict[str, list], progress: bool) -> tuple[list[dict], dict[str, list]]:
    from tqdm.auto import tqdm

    entries: list[dict] = []
    held_out: dict[str, list] = {}
    total = sum(len(items) for items in scenes.values())
    with tqdm(total=total, desc="rendering world", unit="img", disable=not progress) as bar:  # closed on errors too
        for split in SPLITS:
            records = []
            for i, (scene, captions) in enumerate(scenes[split]):
                name = f"{split}_{i:05d}.png"
                payload = _write_png(root / "images" / split / name, render_scene(scene))
                entries.append({"filename": name, "filepath": f"images/{split}", "split": split,
                                "imgid": len(entries), "sentences": [{"raw": c} for c in captions],
                                "scene": scene.metadata()})
                if split in HELD_OUT:
                    records.append((name, scene, payload))
                bar.update()
            held_out[split] = records
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


MANIFEST = "world.json"
MANIFEST_FORMAT = "clipheads.world/2"  # world.json lists every file and folder the world wrote
# names an earlier world (before world.json listed its files) may have written at the top of its folder
_OLD_WORLD_ENTRY = re.compile(r"images|classification|retrieval\.json|selection_\w+\.json|compositional\.json|"
                              r"counterfactual_\w+\.json|templates\.txt|world\.json")


def _names(entries: list[str], limit: int = 3) -> str:
    return ", ".join(entries[:limit]) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _read_manifest(root: Path) -> dict | None:
    """The world.json of a world in ``root`` that lists its files, or None if there is none; raises on one that
    does not list them (an earlier clipheads' world, or someone else's file)."""
    import json

    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and isinstance(data.get("files"), list)
            and isinstance(data.get("folders"), list)
            and all(isinstance(x, str) for x in data["files"] + data["folders"])):
        return data
    if isinstance(data, dict) and "world_version" in data:
        raise DataError(f"{str(root)!r} holds a world written by an earlier clipheads, whose world.json does not list "
                        "its files, so clipheads cannot tell them from yours: write the world to a new or empty folder")
    raise DataError(f"{str(root)!r} holds a world.json that clipheads did not write; write the world to a new or empty "
                    "folder")


def _is_own_temp(relative: str, files: set[str]) -> bool:
    """A temporary file left by an interrupted atomic write of one of ``files`` (``.NAME.XXXXXXXX.tmp``)."""
    folder, _, name = relative.rpartition("/")
    match = re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]+\.tmp", name)
    return bool(match) and (f"{folder}/{match.group(1)}" if folder else match.group(1)) in files


def check_world_folder(out_dir: str | Path) -> list[str]:
    """Check that a world may be written to ``out_dir``, before any work; change nothing.

    The folder may be missing, empty, or hold a world that clipheads wrote there, recognised by its ``world.json``,
    which lists every file and folder that world wrote. Only those may be replaced: any other entry (a user's
    file, or anything added inside the world's folders) is refused, and so is a world without such a list.

    Returns:
        The files (relative, ``/``-separated) of the earlier world that the new one replaces (empty if none).

    Raises:
        DataError: the folder holds something that is not this world's own.
        OutputError: the folder cannot be written (a file in the way, no permission, read-only).
    """
    from clipheads.files import check_output_dir

    root = Path(out_dir)
    check_output_dir(root)
    if not root.is_dir() or not any(root.iterdir()):
        return []
    manifest = _read_manifest(root)
    if manifest is None:
        entries = sorted(entry.name for entry in root.iterdir())
        if all(_OLD_WORLD_ENTRY.fullmatch(name) or name.endswith(".tmp") for name in entries):
            raise DataError(f"{str(root)!r} holds {_names(entries)} but no world.json listing what a clipheads world "
                            "wrote there (an earlier or interrupted world, or your own files): clipheads deletes only "
                            "files it listed; write the world to a new or empty folder")
        raise DataError(f"{str(root)!r} holds files that are not a clipheads world ({_names(entries)}); write the "
                        "world to a new or empty folder")
    files, folders = set(manifest["files"]), set(manifest["folders"])
    others = []
    for current, dirnames, filenames in os.walk(root):
        base = Path(current).relative_to(root).as_posix()
        prefix = "" if base == "." else f"{base}/"
        for name in sorted(dirnames):
            if f"{prefix}{name}" not in folders or (Path(current) / name).is_symlink():
                others.append(f"{prefix}{name}/")
        dirnames[:] = [name for name in dirnames if f"{prefix}{name}/" not in others]
        for name in sorted(filenames):
            relative = f"{prefix}{name}"
            path = Path(current) / name
            own = relative in files or relative == MANIFEST or _is_own_temp(relative, files | {MANIFEST})
            if not own or path.is_symlink() or not path.is_file():
                others.append(relative)
    if others:
        raise DataError(f"{str(root)!r} holds entries that the clipheads world there did not write ({_names(others)}); "
                        "clipheads replaces only its own files: move them or write the world to a new or empty folder")
    return sorted(files)


def _remove_world(root: Path, files: list[str], folders: list[str]) -> None:
    """Delete the listed files of an earlier world (checked by :func:`check_world_folder`), its temporary files and
    the listed folders that are then empty; nothing else."""
    own = set(files) | {MANIFEST}
    for current, _, filenames in os.walk(root):
        for name in filenames:
            relative = (Path(current) / name).relative_to(root).as_posix()
            if relative in own or _is_own_temp(relative, own):
                (Path(current) / name).unlink()
    for folder in sorted(folders, key=lambda f: f.count("/"), reverse=True):
        path = root / folder
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def _planned_files(sizes: WorldSizes, scenes: dict[str, list]) -> list[str]:
    """Every file a world of ``sizes`` writes (relative paths), known before any is written."""
    files = [RETRIEVAL_FILE, "templates.txt"]
    for split, items in scenes.items():
        names = [f"{split}_{i:05d}.png" for i in range(len(items))]
        files += [f"images/{split}/{name}" for name in names]
        if split in HELD_OUT and items:
            files += [f"classification/{split}/{scene.first.shape}/{name}"
                      for name, (scene, _) in zip(names, items, strict=True)]
            files.append(f"selection_{split}.json")
    if sizes.compositional:
        files.append("compositional.json")
        files += [f"images/compositional/pair{i:04d}_{k}.png" for i in range(sizes.compositional) for k in "ab"]
    if sizes.counterfactual:
        for attribute, values in (("cue", MARKER_COLOURS), ("colour", COLOURS)):
            files.append(f"counterfactual_{attribute}.json")
            files += [f"images/counterfactual/{attribute}_g{g:04d}_{value}.png" for g in range(sizes.counterfactual)
                      for value in values]
    return sorted(files)


def _folders_of(files: list[str]) -> list[str]:
    folders = set()
    for file in files:
        parts = file.split("/")[:-1]
        folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(folders)


def make_world(out_dir: str | Path, seed: int = 0, sizes: WorldSizes | None = None,
               progress: bool = True, on_stage: Callable[[str], None] | None = None) -> WorldPaths:
    """Render a world and write every dataset of it under ``out_dir``.

    Before anything is written, ``world.json`` lists every file and folder the world will write (``"complete":
    false``); it is rewritten last (``"complete": true``, with the sizes, seed and the retrieval JSON's sha256). A
    later world written to the same folder replaces only what that list names (see :func:`check_world_folder`).

    Args:
        out_dir: folder to write (created). It must be missing, empty or hold a world written there by clipheads
            with nothing else in it.
        seed: the world's seed; the same seed gives byte-identical files.
        sizes: images per split and pairs/groups per task (default :class:`WorldSizes`).
        progress: show a tqdm progress bar.
        on_stage: called with each stage's name as it ends: ``"render splits"`` (the images of every split), then
            ``"task datasets"`` (classification, caption selection, compositional pairs, counterfactual groups).

    Returns:
        :class:`WorldPaths` of everything written.

    Raises:
        DataError: ``out_dir`` holds something that is not its earlier world's own (nothing is deleted then).
        OutputError: ``out_dir`` cannot be written.
    """
    sizes = sizes or WorldSizes()
    root = Path(out_dir).resolve()
    earlier = check_world_folder(root)
    scenes = {split: list(generate_split(split, sizes.split_size(split), seed)) for split in SPLITS}
    files = _planned_files(sizes, scenes)
    listing = {"format": MANIFEST_FORMAT, "complete": False, "files": files, "folders": _folders_of(files)}
    if earlier:
        _remove_world(root, earlier, _read_manifest(root)["folders"])
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / MANIFEST, listing)  # first: an interrupted world is still known to be clipheads' own
    entries, held_out = _write_splits(root, scenes, progress)
    if on_stage is not None:
        on_stage("render splits")
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
    paths.manifest = root / MANIFEST
    write_json_atomic(paths.manifest, {
        **listing, "complete": True,
        "world_version": WORLD_VERSION, "seed": seed, "sizes": sizes.to_dict(), "splits": SPLITS,
        "cue": {"kind": "8x8 marker in the top-left corner", "p_match_train": P_CUE_MATCH_TRAIN,
                "marker_for_shape": SHAPE_CUE},
        "paths": paths.to_dict(relative=True),
        "retrieval_sha256": hashlib.sha256(paths.retrieval.read_bytes()).hexdigest()})
    logger.info("wrote a world of %d images to %s", len(entries), root)
    if on_stage is not None:
        on_stage("task datasets")
    return paths


def read_split(retrieval_json: str | Path, split: str) -> list[dict]:
    """Entries of one split of a world's Karpathy JSON, with ``path`` (absolute) added to each; the paths and
    captions are read by the general reader, :func:`clipheads.data.retrieval.read_karpathy` (the entries add the
    world's scene metadata). A split without images gives ``[]``."""
    from clipheads.data.io import read_json
    from clipheads.data.retrieval import read_karpathy

    retrieval_json = Path(retrieval_json)
    if retrieval_json.is_dir():
        retrieval_json = retrieval_json / RETRIEVAL_FILE
    if not retrieval_json.exists():
        raise DataError(f"{retrieval_json} not found: write a world first with `clipheads world make --out DIR`")
    data = read_json(retrieval_json)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not all(isinstance(e, dict) for e in images):
        raise DataError(f"{retrieval_json} is not a Karpathy-style JSON with an 'images' list")
    entries = [dict(e) for e in images if e.get("split") == split]
    if entries:
        dataset = read_karpathy(retrieval_json, split, retrieval_json.parent)
        for entry, path in zip(entries, dataset.image_paths, strict=True):
            entry["path"] = str(path)
    return entries
