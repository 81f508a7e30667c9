"""Zero-shot classification datasets: ImageFolder trees or CSV of image + label, class names, prompt templates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipheads.data.imagenet import is_wnid, readable_names
from clipheads.data.io import column, read_table, require, resolve
from clipheads.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_TEMPLATES = Path(__file__).resolve().parent / "templates" / "default.txt"
#: ``--templates NAME``: ``default`` (clipheads' set) or ``openai`` (CLIP's 80 ImageNet templates, as clip_benchmark)
TEMPLATE_PRESETS = {"default": DEFAULT_TEMPLATES, "openai": DEFAULT_TEMPLATES.parent / "openai.txt"}


def load_templates(path: str | Path | None = None) -> list[str]:
    """Prompt templates, one per line with ``{}`` for the class name (``{c}`` also works); ``#`` starts a comment.

    ``None`` reads the default set shipped with clipheads; a name of :data:`TEMPLATE_PRESETS` (``openai``: the 80
    templates of CLIP's ImageNet evaluation that clip_benchmark uses) reads that set.
    """
    path = Path(path) if path is not None else DEFAULT_TEMPLATES
    if not path.exists() and str(path) in TEMPLATE_PRESETS:
        path = TEMPLATE_PRESETS[str(path)]
    if not path.is_file():
        raise DataError(f"template file {str(path)!r} does not exist (or name a preset: "
                        f"{', '.join(TEMPLATE_PRESETS)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"template file {str(path)!r} is not UTF-8 text ({exc}); save it as UTF-8") from None
    templates = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        templates.append(check_template(line.replace("{c}", "{}"), f"{str(path)!r} line {n}"))
    return require(templates, "templates", path)


def check_template(template: str, where: str = "template") -> str:
    """``template`` if ``str.format`` fills it with a class name through exactly one ``{}``, else a one-line error."""
    try:
        filled = template.format("\x00")
    except (IndexError, KeyError, ValueError) as exc:
        raise DataError(f"{where}: str.format cannot fill {template!r} ({type(exc).__name__}: {exc}); write {{}} "
                        "for the class name and {{ }} for literal braces") from None
    if filled.count("\x00") != 1:
        raise DataError(f"{where}: a template needs exactly one {{}} for the class name: {template!r}")
    return template


def load_classnames(path: str | Path) -> list[str]:
    """Class names, one per line, in label order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class name file {str(path)!r} does not exist")
    return require([line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()],
                   "class names", path)


@dataclass
class ClassificationDataset:
    """Images with integer labels into ``classnames``, and the templates that turn a class name into a prompt."""

    image_paths: list[Path]  # or ImageRef (tar member, Hugging Face dataset cell)
    labels: list[int]
    classnames: list[str]
    templates: list[str] = field(default_factory=load_templates)
    name: str = ""
    source: str = ""
    format: str = ""

    def __post_init__(self) -> None:
        require(self.image_paths, "images", self.source or "classification dataset")
        if len(self.labels) != len(self.image_paths):
            raise DataError(f"{self.source}: {len(self.image_paths)} images but {len(self.labels)} labels")
        bad = [label for label in self.labels if not 0 <= label < len(self.classnames)]
        if bad:
            raise DataError(f"{self.source}: label {bad[0]} has no class name ({len(self.classnames)} class names)")

    def __len__(self) -> int:
        return len(self.image_paths)

    def prompts(self) -> list[str]:
        """Every class name in every template, class by class: ``[n_classes * n_templates]``."""
        return [template.format(name) for name in self.classnames for template in self.templates]

    def to_dict(self) -> dict:
        return {"name": self.name, "format": self.format, "source": self.source, "n_images": len(self),
                "n_classes": len(self.classnames), "n_templates": len(self.templates)}


def _visible(path: Path, root: Path) -> bool:
    """Not hidden: no part below ``root`` starts with ``.`` (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def read_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """``root/<class_name>/*.png``: classes in sorted folder order, names with ``_`` read as spaces.

    As torchvision's ``ImageFolder``: hidden entries (``.ipynb_checkpoints/``, ``.DS_Store``) are skipped, and a class
    folder without images is refused (it would be a class no image can have).
    """
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p, root))
    paths, labels, empty = [], [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, root)
                       and p.is_file())
        if not files:
            empty.append(folder.name)
        paths += files
        labels += [label] * len(files)
    require(paths, "images in class sub-folders (ImageFolder layout root/<class>/<image>)", root)
    if empty:
        raise DataError(f"{str(root)!r}: class folder(s) {', '.join(map(repr, empty))} hold no image "
                        f"({', '.join(IMAGE_SUFFIXES)}); remove them or add images")
    names = [f.name for f in folders]
    if names and all(is_wnid(name) for name in names):  # ImageNet train-style n01440764/ folders
        return paths, labels, readable_names(names)
    return paths, labels, [name.replace("_", " ") for name in names]


def read_classification_table(path: Path) -> tuple[list[Path], list[int], list[str]]:
    """CSV/TSV with ``image`` and ``label`` columns; labels are class names (sorted) or integer class ids."""
    rows = require(read_table(path), "rows", path)
    image_col = column(rows, ("image", "filepath", "filename", "path"), path)
    label_col = column(rows, ("label", "class", "classname", "target"), path)
    raw = [row[label_col] for row in rows]
    if all(value.lstrip("-").isdigit() for value in raw):
        labels = [int(value) for value in raw]
        classnames = [str(i) for i in range(max(labels) + 1)]
    else:
        classnames = sorted(set(raw))
        labels = [classnames.index(value) for value in raw]
    return [resolve(path.parent, row[image_col]) for row in rows], labels, classnames


def load_classification(path: str | Path, templates: str | Path | list[str] | None = None,
                        classnames: str | Path | list[str] | None = None, split: str | None = None,
                        image_column: str | None = None, label_column: str | None = None) -> ClassificationDataset:
    """Read classification data; what ``path`` is picks the reader (:func:`clipheads.data.sources.detect_source`).

    Sources: an ImageFolder tree (``n01440764/`` folders get OpenAI's ImageNet names), a CSV/TSV of image,label, a
    flat ImageNet validation folder with its labels, a Hugging Face dataset or Hub id (class names from its
    ``ClassLabel``),
    webdataset shards in clip_benchmark's layout (its ``classnames.txt`` and templates file are used).

    Args:
        templates: a template file, a preset name (``default``, ``openai``), a list of templates, or ``None`` for the
            data's own templates (webdataset) or else clipheads' default set.
        classnames: a file (one per line) or list of class names in label order, replacing the names found in the
            data (needed for integer labels).
        split: the split of data that have splits (Hugging Face ``DatasetDict``, ``{split}/`` shards).
        image_column, label_column: Hugging Face dataset columns (default ``image``, ``label``).
    """
    from clipheads.data.sources import detect_source

    source = detect_source(path, split)
    path = Path(path)
    own_templates = None
    if source in ("hf", "hub"):
        from clipheads.data.hf import read_hf_classification

        paths, labels, names, name = read_hf_classification(path, split, image_column, label_column)
    elif source == "wds":
        from clipheads.data.wds import read_wds_classification

        paths, labels, names, own_templates, name = read_wds_classification(path, split)
    elif source == "imagenet_val":
        from clipheads.data.imagenet import read_imagenet_val

        paths, labels, names, _ = read_imagenet_val(path)
        name = "imagenet1k"  # clip_benchmark's name: every such folder is called val
    elif source == "folder":
        paths, labels, names = read_image_folder(path)
        name = path.name
    elif source == "file":
        paths, labels, names = read_classification_table(path)
        name = path.stem
    else:
        raise DataError(f"{str(path)!r} is {source} data, which has captions, not class labels")
    if classnames is not None:
        given = load_classnames(classnames) if isinstance(classnames, str | Path) else list(classnames)
        if names is not None and len(given) != len(names):
            raise DataError(f"{len(given)} class names given for {len(names)} classes in {str(path)!r}")
        names = given
    if names is None:
        names = [str(i) for i in range(max(labels) + 1)]
    if templates is None and own_templates:
        prompts = [check_template(t.replace("{c}", "{}"), f"{path} template {n}") for n, t in enumerate(own_templates)]
    elif isinstance(templates, list):
        prompts = [check_template(t, f"template {n}") for n, t in enumerate(templates)]
    else:
        prompts = load_templates(templates)
    fmt = {"file": "csv", "folder": "imagefolder", "hub": "hf"}.get(source, source)
    return ClassificationDataset(paths, labels, names, prompts, name, str(path), fmt)
