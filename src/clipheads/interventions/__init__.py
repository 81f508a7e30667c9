"""Head masks and the operators that ablate heads."""

from clipheads.interventions.engine import Intervention, ablate, apply, bake, compute_head_means, remove
from clipheads.interventions.mask import HeadMask
from clipheads.interventions.operators import BAKEABLE, OPERATORS, Operator, resolve_operator

__all__ = ["BAKEABLE", "HeadMask", "Intervention", "OPERATORS", "Operator", "ablate", "apply", "bake",
           "compute_head_means", "remove", "resolve_operator"]
