"""Head masks and the operators that ablate heads."""

from clipheads.interventions.engine import (
    Intervention,
    ablate,
    apply,
    bake,
    check_means_kind,
    compute_head_means,
    remove,
)
from clipheads.interventions.mask import HeadMask
from clipheads.interventions.operators import BAKEABLE, MEAN_KINDS, OPERATORS, Operator, means_kind, resolve_operator
from clipheads.interventions.patching import PatchResult, patch, patch_effects, record_head_outputs

__all__ = ["BAKEABLE", "HeadMask", "Intervention", "MEAN_KINDS", "OPERATORS", "Operator", "ablate", "apply", "bake",
           "check_means_kind", "compute_head_means", "means_kind", "patch", "patch_effects", "PatchResult",
           "record_head_outputs", "remove", "resolve_operator"]
