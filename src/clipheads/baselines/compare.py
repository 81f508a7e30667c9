"""AAT against fine-tuning and PEFT on the same data: held-out mean-R, trainable parameters, training wall time.

Every method learns from the same training split (its image-text pairs and, for AAT-GA, its retrieval metric),
is followed on a validation split after every epoch (fine-tuning) and is reported on a held-out split:

    result = compare_baselines(backend, train, val, test, CompareConfig(methods=("vanilla", "aat-ga", "lora-r8")))
    result.rows[1].test_mean_recall, result.rows[1].trainable_params

``train``, ``val`` and ``test`` are :class:`clipheads.search.SearchData` retrieval splits
(:func:`clipheads.search.load_search_data`). An AAT mask counts one *bit* per head (``n_layers x n_heads``, whatever
the number of heads it ablates), fine-tuning counts the trainable parameters (for LoRA/IA3 only the adapters).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clipheads.baselines.finetune import FinetuneConfig, finetune
from clipheads.errors import ClipHeadsError
from clipheads.models import CLIPBackend
from clipheads.search import BPConfig, GAConfig, MaskEvaluator, SearchData, bp_search, ga_search, scan_heads

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("vanilla", "aat-ga", "aat-bp", "lora-r2", "lora-r8", "full")
_METHOD = re.compile(r"^(vanilla|aat-ga|aat-bp|full|ia3|lora-r(\d+))$")


def parse_methods(methods: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"vanilla,aat-ga,lora-r2,full"`` -> a checked list; known: vanilla, aat-ga, aat-bp, lora-rN, ia3, full."""
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    bad = [m for m in names if not _METHOD.match(m) or m == "lora-r0"]
    if bad or not names:
        raise ClipHeadsError(f"unknown method(s) {', '.join(bad) or '(none given)'}; choose from vanilla, aat-ga, "
                             "aat-bp, lora-rN (LoRA of rank N, e.g. lora-r8), ia3, full")
    if len(set(names)) != len(names):
        raise ClipHeadsError(f"a method is listed twice in {', '.join(names)}")
    return names


@dataclass
class CompareConfig:
    """What to compare and how long to train. ``lr=None`` uses the per-method default of :class:`FinetuneConfig`
    (full: 1e-5, lora/ia3: 1e-3); ``full_lr`` overrides it for full fine-tuning only."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    epochs: int = 3
    batch_size: int = 64
    lr: float | None = None
    full_lr: float | None = None
    lora_alpha_per_rank: float = 2.0  # lora_alpha = this x rank (peft's scaling alpha / r stays constant)
    weight_decay: float = 0.1
    op: str = "identity"
    ga: GAConfig = field(default_factory=lambda: GAConfig(population=16, generations=8))
    bp: BPConfig = field(default_factory=lambda: BPConfig(beta=0.1, epochs=3, batch_size=64, lr=0.2, init_logit=1.5))
    eval_batch_size: int = 128
    seed: int = 0

    def finetune_config(self, method: str) -> FinetuneConfig:
        """The :class:`FinetuneConfig` of ``full``, ``ia3`` or ``lora-rN``."""
        rank = int(method.split("-r")[1]) if method.startswith("lora-r") else 8
        name = "lora" if method.startswith("lora-r") else method
        lr = self.full_lr if name == "full" and self.full_lr is not None else self.lr
        return FinetuneConfig(method=name, rank=rank, lora_alpha=max(1, round(self.lora_alpha_per_rank * rank)),
                              epochs=self.epochs, batch_size=self.batch_size, lr=lr,
                              weight_decay=self.weight_decay, seed=self.seed)

    def to_dict(self) -> dict:
        return {**asdict(self), "methods": list(self.methods), "ga": self.ga.to_dict(), "bp": self.bp.to_dict()}


@dataclass
class ComparisonRow:
    """One method. ``trainable_params`` is in ``params_unit``: ``bits`` for AAT masks (one per head), else
    ``parameters``. ``wall_time_s``: training (or search) on the training split; fine-tuning without its per-epoch
    validation, AAT without the one forward pass that caches the training images' residual stream (shared by both
    AAT rows); AAT-GA with the single-head scan that seeds it."""

    method: str
    family: str  # reference | ablation | fine-tuning
    trainable_params: int
    params_unit: str
    wall_time_s: float
    val_mean_recall: float
    test_mean_recall: float
    per_epoch: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class ComparisonResult:
    """All rows, with the splits they were trained on, validated on and reported on."""

    metric: str
    train_split: str
    val_split: str
    test_split: str
    n_train_images: int
    n_train_texts: int
    rows: list[ComparisonRow]
    config: dict
    model: str = ""

    def row(self, method: str) -> ComparisonRow:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(method)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[dict]:
        """Rows for printing: mean-R in percent, the held-out change against vanilla (splits: see :meth:`caption`)."""
        vanilla = next((r.test_mean_recall for r in self.rows if r.method == "vanilla"), None)
        return [{"method": r.method,
                 "trainable": f"{r.trainable_params:,} {'bits' if r.params_unit == 'bits' else 'params'}",
                 "train time (s)": f"{r.wall_time_s:.1f}", "val mean-R": f"{100 * r.val_mean_recall:.1f}",
                 "held-out mean-R": f"{100 * r.test_mean_recall:.1f}",
                 "change": "" if vanilla is None else f"{100 * (r.test_mean_recall - vanilla):+.1f}"}
                for r in self.rows]

    def caption(self) -> str:
        return (f"{self.metric} in %; trained on {self.train_split} ({self.n_train_images} images, "
                f"{self.n_train_texts} captions), validated on {self.val_split}, held out: {self.test_split}; "
                "AAT masks count one bit per head")

    def markdown(self) -> str:
        rows = self.table()
        header = list(rows[0]) if rows else []
        lines = [self.caption(), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
        return "\n".join(lines) + "\n"


def _check_splits(train: SearchData, val: SearchData, test: SearchData, allow_same_split: bool) -> None:
    if allow_same_split:
        return
    for role, other in (("validation", val), ("held-out", test)):
        if other is train or (train.split and train.split == other.split):
            raise ClipHeadsError(f"the training split and the {role} split are both {train.split!r}; compare on "
                                 "held-out data (another split) or pass --allow-same-split")


@torch.inference_mode()
def _score(backend: CLIPBackend, data: SearchData, batch_size: int) -> float:
    """The split's objective (mean-R) on the image features of ``backend`` as it is now (e.g. fine-tuned)."""
    features = torch.cat([backend.encode_image(chunk) for chunk in data.pixels.split(batch_size)])
    return float(data.objective(features))


def compare_baselines(backend: CLIPBackend, train: SearchData, val: SearchData, test: SearchData,
                      config: CompareConfig | None = None, checkpoint_dir: str | Path | None = None,
                      allow_same_split: bool = False,
                      on_method: Callable[[str], None] | None = None) -> ComparisonResult:
    """Run every method of ``config.methods`` on ``train`` and score it on ``val`` and ``test``.

    ``on_method`` is called with each method's name once its row is done (the first one also covers encoding the
    validation and held-out splits).

    ``backend`` is never modified: each fine-tuning run trains a deep copy. With ``checkpoint_dir``, each
    fine-tuned model is saved to ``checkpoint_dir/<method>`` by the libraries' own save functions (peft
    ``save_pretrained`` adapters, ``transformers`` ``save_pretrained``, ``torch.save`` for open_clip) and each AAT
    mask to ``checkpoint_dir/<method>/mask.json``.
    """
    config = config or CompareConfig()
    methods = parse_methods(config.methods)
    _check_splits(train, val, test, allow_same_split)
    if train.pairs is None:
        raise ClipHeadsError("the comparison trains on image-text pairs; the training split has none (use retrieval)")
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    bits = backend.n_layers * backend.n_heads
    held_out = {"batch_size": config.eval_batch_size, "cache_stride": backend.n_layers}
    val_eval = MaskEvaluator(backend, val.pixels, val.objective, config.op, split=val.split, **held_out)
    test_eval = MaskEvaluator(backend, test.pixels, test.objective, config.op, split=test.split, **held_out)
    train_eval = None
    rows: list[ComparisonRow] = []
    for method in methods:
        log.info("comparison: %s", method)
        if method == "vanilla":
            rows.append(ComparisonRow(method, "reference", 0, "parameters", 0.0, val_eval.baseline,
                                      test_eval.baseline))
            if on_method is not None:
                on_method(method)
            continue
        if method.startswith("aat-"):
            if train_eval is None:
                train_eval = MaskEvaluator(backend, train.pixels, train.objective, config.op, split=train.split,
                                           batch_size=config.eval_batch_size, progress=True)
            started = time.perf_counter()
            if method == "aat-ga":
                scan = scan_heads(train_eval) if config.ga.seed_from_scan else None
                result = ga_search(train_eval, config.ga, scan=scan)
                per_epoch = [{"generation": h["generation"] + 1, "train_mean_recall": h["best_metric"],
                              "n_ablated": h["best_n_ablated"]} for h in result.history]
            else:
                result = bp_search(train_eval, *train.pairs, config.bp)
                per_epoch = [{"epoch": h["epoch"] + 1, "train_mean_recall": h["metric"], "train_loss": h["loss"],
                              "n_ablated": h["n_ablated"]} for h in result.history]
            seconds = time.perf_counter() - started  # GA: with the single-head scan that seeds it
            mask = result.mask
            if checkpoint_dir is not None:
                mask.meta.update({"strategy": method, "operator": result.operator, "searched_on": train.split,
                                  "model": backend.name})
                mask.save((checkpoint_dir / method).joinpath("mask.json"))
            rows.append(ComparisonRow(method, "ablation", bits, "bits", seconds, val_eval.evaluate(mask),
                                      test_eval.evaluate(mask), per_epoch,
                                      {"ablated": mask.ablated, "n_ablated": mask.n_ablated,
                                       "train_mean_recall": result.search_metric,
                                       "train_vanilla": result.search_baseline}))
        else:
            rows.append(_finetune_row(backend, method, train, val, test, config, checkpoint_dir))
        if on_method is not None:
            on_method(method)
    n_texts = len(train.pairs[0])
    return ComparisonResult(val.objective.name, train.split, val.split, test.split, len(train.pixels), n_texts,
                            rows, config.to_dict(), backend.name)


def _finetune_row(backend: CLIPBackend, method: str, train: SearchData, val: SearchData, test: SearchData,
                  config: CompareConfig, checkpoint_dir: Path | None) -> ComparisonRow:
    tuned = copy.deepcopy(backend)
    validation_seconds = 0.0

    def validate(model: CLIPBackend) -> float:
        nonlocal validation_seconds
        started = time.perf_counter()
        value = _score(model, val, config.eval_batch_size)
        validation_seconds += time.perf_counter() - started
        return value

    texts, text_to_image = train.pairs
    out = checkpoint_dir / method if checkpoint_dir is not None else None
    tuned, result = finetune(tuned, train.pixels, texts, config.finetune_config(method), validate, out,
                             text_to_image=text_to_image)
    per_epoch = [{"epoch": h.epoch, "train_loss": h.train_loss, "val_mean_recall": h.val_metric,
                  "seconds": h.seconds} for h in result.history]
    test_value = _score(tuned, test, config.eval_batch_size)
    extra = {"total_params": result.total_params, "lr": config.finetune_config(method).learning_rate(),
             "wall_time_with_validation_s": result.wall_seconds}
    if out is not None:
        extra["checkpoint"] = str(out)
    return ComparisonRow(method, "fine-tuning", result.trainable_params, "parameters",
                         result.wall_seconds - validation_seconds, result.history[-1].val_metric, test_value,
                         per_epoch, extra)
