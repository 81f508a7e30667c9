"""clipheads: find the attention heads of CLIP's image encoder that hurt, ablate them, explain them.

    import clipheads
    model = clipheads.load("bundled")      # or "openai/clip-vit-base-patch32", "open_clip:ViT-B-32/openai"
    mask = clipheads.HeadMask.from_heads("L3.H7,L5.H1", model)
    with clipheads.ablate(model, mask, op="identity"):
        features = model.encode_image(images)   # PIL images, or pixels [B, 3, H, W]
    clipheads.save(clipheads.bake(model, mask, op="zero"), "baked")  # clipheads.load("baked") reads it back
"""

from clipheads.errors import ClipHeadsError, DataError, MaskError, ModelLoadError, OperatorError
from clipheads.heads import head_label, parse_head, parse_heads, parse_layers
from clipheads.interventions import (
    OPERATORS,
    HeadMask,
    Operator,
    ablate,
    apply,
    bake,
    compute_head_means,
    patch,
    remove,
)
from clipheads.models import Architecture, CLIPBackend, as_backend, load, save
from clipheads.runtime import set_threads

__version__ = "0.1.0"

__all__ = ["OPERATORS", "Architecture", "CLIPBackend", "ClipHeadsError", "DataError", "HeadMask", "MaskError",
           "ModelLoadError", "Operator", "OperatorError", "ablate", "apply", "as_backend", "bake",
           "compute_head_means", "head_label", "load", "parse_head", "parse_heads", "parse_layers", "patch", "remove",
           "save", "set_threads"]
