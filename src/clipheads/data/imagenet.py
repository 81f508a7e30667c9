"""ImageNet as distributed: the flat validation folder with its labels, and training-style ``n01440764/`` folders.

Labels of the flat ``ILSVRC2012_val_*.JPEG`` folder come from the first of these found in the folder or up to four
levels up (Kaggle keeps ``LOC_val_solution.csv`` beside ``ILSVRC/``, its images in ``ILSVRC/Data/CLS-LOC/val/``):
torchvision's ``meta.bin`` (read with ``torchvision.datasets.imagenet.load_meta_file``), Kaggle's
``LOC_val_solution.csv``, or the devkit (``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` with
``meta.mat``, read as torchvision does). Classes are the label source's WordNet ids in sorted order (all 1000 for the
real files: the standard class index). WordNet ids are shown with OpenAI's ImageNet class names (as clip_benchmark
uses them: ``classnames/imagenet_openai.txt``), indexed through timm's list of the 1000 synsets.
"""

from __future__ import annotations

import csv
import re
from functools import cache
from pathlib import Path

from clipheads.errors import DataError

OPENAI_CLASSNAMES = Path(__file__).resolve().parent / "classnames" / "imagenet_openai.txt"
WNID = re.compile(r"n\d{8}")
DEVKIT_TRUTH = Path("data") / "ILSVRC2012_validation_ground_truth.txt"


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (timm's ``ImageNetInfo``)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


@cache
def openai_classnames() -> tuple[str, ...]:
    """OpenAI's readable ImageNet class names, in class-index order (``[1000]``)."""
    return tuple(OPENAI_CLASSNAMES.read_text(encoding="utf-8").splitlines())


def readable_names(wnids: list[str], fallback: dict[str, str] | None = None) -> list[str]:
    """OpenAI's name for each ImageNet-1k WordNet id; other ids keep ``fallback[wnid]`` or the id itself."""
    index = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
    names = openai_classnames()
    fallback = fallback or {}
    return [names[index[w]] if w in index else fallback.get(w, w) for w in wnids]


def is_wnid(name: str) -> bool:
    return WNID.fullmatch(name) is not None


def _label_source(folder: Path) -> Path:
    # Kaggle's layout holds LOC_val_solution.csv four levels above its val folder: ILSVRC/Data/CLS-LOC/val
    for where in (folder, *list(folder.resolve().parents)[:4]):
        for candidate in (where / "meta.bin", where / "LOC_val_solution.csv",
                          where / "ILSVRC2012_devkit_t12" / DEVKIT_TRUTH, where / DEVKIT_TRUTH):
            if candidate.is_file():
                return candidate
    raise DataError(f"{str(folder)!r} is a flat ImageNet validation folder but no labels were found beside it or up "
                    "to four levels up: put meta.bin (torchvision), LOC_val_solution.csv (Kaggle, which keeps it "
                    "beside ILSVRC/) or the devkit ILSVRC2012_devkit_t12/ there")


def _devkit(truth: Path) -> tuple[dict[str, str], list[str]]:
    """(wnid -> first synonym, wnid of each validation image) from the devkit, as torchvision parses it."""
    import scipy.io as sio

    meta_file = truth.parent / "meta.mat"
    if not meta_file.is_file():
        raise DataError(f"{str(truth)!r} needs the devkit's {str(meta_file)!r} to map its ids to classes")
    meta = sio.loadmat(str(meta_file), squeeze_me=True)["synsets"]
    leaves = [entry for entry in meta if int(entry[4]) == 0]  # num_children == 0: the 1000 classes
    id_to_wnid = {int(entry[0]): str(entry[1]) for entry in leaves}
    words = {str(entry[1]): str(entry[2]).split(", ")[0] for entry in leaves}
    try:
        return words, [id_to_wnid[int(line)] for line in truth.read_text().split()]
    except (KeyError, ValueError) as exc:
        raise DataError(f"{str(truth)!r}: {exc} is not an ILSVRC2012_ID of meta.mat") from None


def read_imagenet_val(folder: Path) -> tuple[list[Path], list[int], list[str], str]:
    """``(image paths [N], labels [N], class names [C], label file)`` of a flat ImageNet validation folder."""
    images = sorted(p for p in folder.iterdir() if p.name.startswith("ILSVRC2012_val_") and p.is_file())
    source = _label_source(folder)
    words: dict[str, str] = {}
    if source.name == "meta.bin":
        from torchvision.datasets.imagenet import load_meta_file

        wnid_to_classes, val_wnids = load_meta_file(source.parent)
        words = {wnid: names[0] for wnid, names in wnid_to_classes.items()}
        all_wnids = sorted(wnid_to_classes)
        by_file = dict(zip(images, val_wnids, strict=False))  # torchvision: sorted validation files, in order
        if len(val_wnids) != len(images):
            raise DataError(f"{str(source)!r} labels {len(val_wnids)} validation images but {str(folder)!r} holds "
                            f"{len(images)}")
    elif source.name == "LOC_val_solution.csv":
        with source.open(newline="", encoding="utf-8-sig") as handle:
            solution = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(handle)}
        all_wnids = sorted(set(solution.values()))
        by_file = {p: solution[p.stem] for p in images if p.stem in solution}
    else:
        words, truth = _devkit(source)
        all_wnids = sorted(words)
        by_file = {p: truth[int(p.stem.rsplit("_", 1)[1]) - 1] for p in images
                   if int(p.stem.rsplit("_", 1)[1]) <= len(truth)}
    unlabelled = [p.name for p in images if p not in by_file]
    if unlabelled:
        raise DataError(f"{str(source)!r} has no label for {len(unlabelled)} image(s) of {str(folder)!r} "
                        f"(first: {unlabelled[0]})")
    index = {wnid: i for i, wnid in enumerate(all_wnids)}
    return images, [index[by_file[p]] for p in images], readable_names(all_wnids, words), str(source)
