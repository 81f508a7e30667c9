"""Which heads to ablate: single-head and layer scans, AAT-GA, AAT-BP and greedy selection on a fast mask evaluator.

    evaluator = MaskEvaluator(model, pixels, retrieval_objective(text_features, text_to_image), op="identity")
    scan = scan_heads(evaluator)                       # every head alone: scan.delta is [L, H]
    result = ga_search(evaluator, GAConfig(beta=0.01), scan=scan, report=heldout_evaluator)
"""

from clipheads.search.bp import BPConfig, bp_search, clip_loss, threshold_mask
from clipheads.search.distributed import Distributed
from clipheads.search.engine import MaskEvaluator, first_layer, stacked_gate_hook
from clipheads.search.ga import BetaSweepResult, GAConfig, beta_sweep, ga_search
from clipheads.search.greedy import GreedyConfig, greedy_search
from clipheads.search.objectives import Objective, retrieval_objective
from clipheads.search.results import SearchResult, check_splits, fitness, report_heldout, write_result
from clipheads.search.scan import (
    LayerScanResult,
    ScanResult,
    evaluate_top_k,
    scan_heads,
    scan_layers,
    scan_search_result,
)
from clipheads.search.state import ConfigMismatchError, RunFolder
from clipheads.search.tasks import SearchData, load_search_data

__all__ = ["BPConfig", "BetaSweepResult", "ConfigMismatchError", "Distributed", "GAConfig", "GreedyConfig",
           "LayerScanResult", "MaskEvaluator", "Objective", "RunFolder", "ScanResult", "SearchData", "SearchResult",
           "beta_sweep", "evaluate_top_k", "load_search_data",
           "bp_search", "check_splits", "clip_loss", "first_layer", "fitness", "ga_search", "greedy_search",
           "report_heldout", "retrieval_objective", "scan_heads", "scan_layers", "scan_search_result",
           "stacked_gate_hook", "threshold_mask", "write_result"]
