"""Baselines that AAT is compared with: full fine-tuning and PEFT (LoRA, IA3) of the image encoder, and the
comparison of all of them with AAT-GA / AAT-BP on the same training data."""

from clipheads.baselines.compare import (
    DEFAULT_METHODS,
    CompareConfig,
    ComparisonResult,
    ComparisonRow,
    compare_baselines,
    parse_methods,
)
from clipheads.baselines.finetune import (
    METHODS,
    EpochRecord,
    FinetuneConfig,
    FinetuneResult,
    contrastive_loss,
    finetune,
    prepare_model,
    save_finetuned,
)

__all__ = ["DEFAULT_METHODS", "METHODS", "CompareConfig", "ComparisonResult", "ComparisonRow", "EpochRecord",
           "FinetuneConfig", "FinetuneResult", "compare_baselines", "contrastive_loss", "finetune", "parse_methods",
           "prepare_model", "save_finetuned"]
