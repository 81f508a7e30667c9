"""``clipheads.save``: write a model (e.g. one from ``clipheads.bake``) with everything needed to load it back.

A folder written here loads with ``clipheads.load(folder)`` and with the library's own loader:

* ``transformers``: ``save_pretrained`` of the model, its tokenizer and its image processor (``config.json``,
  ``model.safetensors``, ``tokenizer*.json``, ``preprocessor_config.json``), i.e. ``CLIPModel.from_pretrained``,
  ``AutoTokenizer.from_pretrained`` and ``AutoImageProcessor.from_pretrained`` read it; a CLIP's towers used apart
  (:class:`clipheads.models.hf.CLIPTowers`) as two such folders, ``vision/`` (with the image processor) and
  ``text/`` (with the tokenizer);
* ``open_clip``: the layout of open_clip's own ``save_for_hf`` (``open_clip_config.json`` with the model config and
  the preprocessing config, ``open_clip_model.safetensors``), i.e.
  ``open_clip.create_model_and_transforms("local-dir:FOLDER")`` reads it (clipheads: ``open_clip:local-dir:FOLDER``
  or just the folder).

Besides, ``clipheads.json`` records the model's architecture, every bake folded into it (source model, operator,
ablated heads) and the clipheads version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from clipheads.errors import ClipHeadsError
from clipheads.files import write_json_atomic
from clipheads.models.base import CLIPBackend, recall_input

SIDECAR = "clipheads.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def check_output_folder(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse (one line) an output folder that is a file, or that already holds files, unless it is a model saved
    here before and ``overwrite`` is set (a folder of other files is never replaced: they would be lost)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ClipHeadsError(f"output {str(directory)!r} is a file, not a folder")
    if directory.is_dir() and any(directory.iterdir()):
        if not (directory / SIDECAR).is_file():
            raise ClipHeadsError(f"output folder {str(directory)!r} holds other files; choose a new or empty folder")
        if not overwrite:
            raise ClipHeadsError(f"output folder {str(directory)!r} holds a saved model; choose a new folder or "
                                 "replace it (overwrite=True, CLI: --overwrite)")
    return directory


def save(model: CLIPBackend | nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` to ``directory`` so that ``clipheads.load(directory)`` gives the same model back.

    Args:
        model: a backend (``clipheads.load``) or a library model, e.g. the result of ``clipheads.bake``, which keeps
            the tokenizer, image processor and open_clip config of the model it was baked from.
        directory: the output folder; written atomically (a temporary sibling folder renamed into place), so an
            interrupted save leaves nothing half-written.
        overwrite: replace a model saved there before (a folder with other files is always refused).

    Returns:
        The folder.

    Raises:
        ClipHeadsError: the folder is a file, holds other files, or holds a saved model and not ``overwrite``; the
            model has an ablation applied (hooks are not weights: bake it first); the model's tokenizer
            (transformers) or model config (open_clip) is unknown.
    """
    from clipheads import __version__
    from clipheads.models import as_backend

    directory = check_output_folder(directory, overwrite)
    backend = as_backend(model)
    if backend.intervention is not None or backend.hooked_layers:
        raise ClipHeadsError("clipheads.save writes weights, but this model has an ablation applied (hooks, not "
                             "weights); fold it in with clipheads.bake(model, mask, op) and save the result")
    writer = _save_hf if backend.kind == "hf" else _save_open_clip
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        writer(backend, tmp)
        write_json_atomic(tmp / SIDECAR, {"format": "clipheads.saved/1", "backend": backend.kind,
                                          "class": type(backend.model).__name__,
                                          "architecture": backend.architecture.to_dict(),
                                          "baked": recall_input(backend.model, "baked") or [],
                                          "load": f"clipheads.load({str(directory)!r})",
                                          "clipheads_version": __version__})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved model is meant to be shared like any folder
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _save_hf(backend, folder: Path) -> None:
    if backend.tokenizer is None:
        raise ClipHeadsError(f"{backend.name}: no tokenizer is known for this model, and a folder without one would "
                             "encode every caption as unknown tokens; wrap the model with "
                             "HFBackend(model, name, tokenizer=...) or load it with clipheads.load")
    from clipheads.models.hf import TOWER_FOLDERS, CLIPTowers

    if isinstance(backend.model, CLIPTowers):  # the towers used apart: vision/ and text/, each a from_pretrained folder
        vision, text = (folder / name for name in TOWER_FOLDERS)
        backend.model.vision.save_pretrained(vision)
        backend._processor().save_pretrained(vision)
        backend.model.text.save_pretrained(text)
        backend.tokenizer.save_pretrained(text)
        return
    backend.model.save_pretrained(folder)
    backend.tokenizer.save_pretrained(folder)
    backend._processor().save_pretrained(folder)  # the model's own processor, else CLIP's standard at its size


def _save_open_clip(backend, folder: Path) -> None:
    import safetensors.torch
    from open_clip.push_to_hf_hub import save_config_for_hf

    if backend.model_cfg is None:
        raise ClipHeadsError(f"{backend.name}: its open_clip model config is unknown (the model was not built by "
                             "clipheads.load); wrap it with OpenCLIPBackend(model, name, "
                             "model_cfg=open_clip.get_model_config(ARCH))")
    state = {k: v.detach().cpu().contiguous() for k, v in backend.model.state_dict().items()}
    safetensors.torch.save_file(state, folder / OPEN_CLIP_WEIGHTS)
    save_config_for_hf(backend.model, folder / OPEN_CLIP_CONFIG, model_config=backend.model_cfg)
    tokenizer = backend._tokenizer
    if hasattr(tokenizer, "save_pretrained"):  # an HF tokenizer (open_clip's own BPE ships inside open_clip)
        tokenizer.save_pretrained(folder)
