"""clip_benchmark's dataset names (``--dataset flickr30k --dataset-root DIR``) built by its own ``build_dataset``.

clip_benchmark's builder downloads (``wget``, ``kaggle``, torchvision) whatever is missing; clipheads never lets it:
the files it would fetch are checked first and a missing one is one line saying where clip_benchmark expects it, and
the builder runs with ``download=False``. The built dataset is read through its files (``Flickr.data``,
``CocoCaptions``' annotations, ``samples`` / ``_image_files`` + ``_labels`` of torchvision datasets) with
clip_benchmark's class names and templates; datasets held only in memory are refused in one line.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from clipheads.data.classification import ClassificationDataset, check_template, load_templates
from clipheads.data.retrieval import RetrievalDataset
from clipheads.errors import DataError

# files (relative to the root; {split}) that the builder would download when missing
_NEEDED = {
    "flickr30k": ("flickr30k_{split}_karpathy.txt",),
    "flickr8k": ("flickr8k_{split}_karpathy.txt",),
    "mscoco_captions": ("coco_{split}_karpathy.json", "{coco}"),
    "imagenet1k": ("{imagenet}",),
}


def _expected(name: str, root: Path, split: str) -> list[str]:
    coco = "train2014" if split == "train" else "val2014"
    imagenet = "train" if split == "train" else "val"
    return [item.format(split=split, coco=coco, imagenet=imagenet) for item in _NEEDED.get(name, ())]


def build_clip_benchmark(name: str, root: str | Path, split: str = "test", task: str | None = None):
    """clip_benchmark's ``build_dataset(name, root, split, download=False)``, after checking that nothing would be
    downloaded; one-line errors."""
    try:
        from clip_benchmark.datasets.builder import build_dataset, get_dataset_default_task
    except ImportError as exc:
        raise DataError(f"--dataset needs clip_benchmark ({exc}); pip install 'clipheads[bench]'") from None
    root = Path(root)
    missing = [item for item in _expected(name, root, split) if not (root / item).exists()]
    if not root.is_dir() or missing:
        what = f"{root}" + (f" with {', '.join(missing)}" if root.is_dir() else "")
        raise DataError(f"clip_benchmark expects {name!r} (split {split!r}) at {what}; clipheads does not "
                        "download: put the data there, or pass the files with --data")
    task = task or get_dataset_default_task(name)
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):
            return build_dataset(name, root=str(root), transform=None, split=split, download=False, task=task)
    except SystemExit:
        raise DataError(f"clip_benchmark could not build {name!r} from {str(root)!r} (it tried to download: "
                        f"{quiet.getvalue().strip()[:120]})") from None
    except (OSError, RuntimeError, ValueError, AssertionError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if "download=True" in reason:  # torchvision's advice, which clipheads does not take
            raise DataError(f"clip_benchmark found no {name!r} in {str(root)!r} (torchvision: "
                            f"{reason.split('.')[0].strip()}); clipheads does not download: export it where there is "
                            "network with clip_benchmark_export_wds and pass the shards with --data") from None
        raise DataError(f"clip_benchmark could not build {name!r} from {str(root)!r} ({reason})") from None


def load_clip_benchmark_retrieval(name: str, root: str | Path, split: str = "test") -> RetrievalDataset:
    """A clip_benchmark retrieval dataset (Flickr-style ``data`` of (image file, captions), or ``CocoCaptions``)."""
    ds = build_clip_benchmark(name, root, split, "zeroshot_retrieval")
    if hasattr(ds, "data") and hasattr(ds, "root") and isinstance(ds.data, list):
        paths = [Path(ds.root) / image for image, _ in ds.data]
        captions = [list(caps) for _, caps in ds.data]
    elif hasattr(ds, "coco") and hasattr(ds, "ids"):
        images = [ds.coco.loadImgs(i)[0]["file_name"] for i in ds.ids]
        paths = [Path(ds.root) / image for image in images]
        captions = [[a["caption"] for a in ds.coco.imgToAnns[i]] for i in ds.ids]
    else:
        raise DataError(f"clipheads cannot read the images of clip_benchmark's {name!r} as files "
                        f"({type(ds).__name__}); pass its files with --data")
    return RetrievalDataset(paths, captions, name, split, f"clip_benchmark:{name}:{root}", "clip_benchmark")


def load_clip_benchmark_classification(name: str, root: str | Path, split: str = "test",
                                       templates: str | Path | list[str] | None = None) -> ClassificationDataset:
    """A clip_benchmark classification dataset with its class names and (unless ``templates``) its templates."""
    ds = build_clip_benchmark(name, root, split, "zeroshot_classification")
    if hasattr(ds, "samples"):
        paths, labels = [Path(p) for p, _ in ds.samples], [int(y) for _, y in ds.samples]
    elif hasattr(ds, "_image_files") and hasattr(ds, "_labels"):
        paths, labels = [Path(p) for p in ds._image_files], [int(y) for y in ds._labels]
    else:
        raise DataError(f"clipheads cannot read the images of clip_benchmark's {name!r} as files "
                        f"({type(ds).__name__} holds them in memory); export them with clip_benchmark_export_wds "
                        "and pass the shards with --data")
    classnames = list(getattr(ds, "classes", None) or [])
    own = getattr(ds, "templates", None)
    if templates is None and isinstance(own, list) and own:
        prompts = [check_template(t.replace("{c}", "{}"), f"clip_benchmark {name} template {n}")
                   for n, t in enumerate(own)]
    elif isinstance(templates, list):
        prompts = [check_template(t, f"template {n}") for n, t in enumerate(templates)]
    else:
        prompts = load_templates(templates)
    return ClassificationDataset(paths, labels, classnames, prompts, name, f"clip_benchmark:{name}:{root}",
                                 "clip_benchmark")


__all__ = ["build_clip_benchmark", "load_clip_benchmark_classification", "load_clip_benchmark_retrieval"]
