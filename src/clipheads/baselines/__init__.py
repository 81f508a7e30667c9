"""Baselines that AAT is compared with: full fine-tuning and PEFT (LoRA, IA3) of the image encoder."""

from clipheads.baselines.finetune import (
    METHODS,
    EpochRecord,
    FinetuneConfig,
    FinetuneResult,
    contrastive_loss,
    finetune,
    prepare_model,
)

__all__ = ["METHODS", "EpochRecord", "FinetuneConfig", "FinetuneResult", "contrastive_loss", "finetune",
           "prepare_model"]
