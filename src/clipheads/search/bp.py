"""AAT-BP: one gate logit per head, learned by back-propagation with the model frozen, then thresholded.

``gate = sigmoid(logit)`` soft-gates each head with the search operator (``g*out + (1-g)*replacement``). The loss
is the CLIP contrastive loss of the training image-text pairs (image features of the gated model against cached
text features) plus ``beta * mean(1 - gate)``, the price of ablating. The images' residual stream entering layer 0
is taken from the evaluator's cache, so training never re-embeds an image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from clipheads.errors import ClipHeadsError, require
from clipheads.heads import parse_head
from clipheads.interventions import HeadMask, ablate
from clipheads.metrics.retrieval import captions_by_image, clip_loss
from clipheads.models.base import frozen_parameters
from clipheads.search.distributed import Distributed
from clipheads.search.engine import MaskEvaluator
from clipheads.search.memory import format_size, forward_bytes
from clipheads.search.results import SearchResult, check_splits, fitness, report_heldout, write_result
from clipheads.search.scan import ScanResult
from clipheads.search.state import RunFolder

log = logging.getLogger(__name__)

CHECKPOINT = "bp_state.pt"


@dataclass
class BPConfig:
    """Hyper-parameters of AAT-BP, the one set of defaults of the CLI (``clipheads search --strategy bp``), the Python
    API and the demo. Gates start at ``sigmoid(init_logit)``; heads with ``gate < threshold`` are ablated in the final
    mask. The loss is the contrastive loss + ``beta * mean(1 - gate)``.

    Adam moves each logit by about ``lr`` per step, so a gate needs at least ``init_logit / lr`` steps to fall from its
    start to 0.5: ``init_logit=1.5, lr=0.2`` (gate 0.82 at the start, 8 steps) leaves room on small search splits,
    where the former ``3.0, 0.1`` (30 steps) ablated nothing. Chosen on the bundled world (README, "Choosing AAT-BP's
    defaults"): gates fitted on val_ood images, settings compared on other val_ood images, test_ood only reported.
    """

    beta: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.2
    init_logit: float = 1.5
    threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.epochs >= 0, f"AAT-BP epochs cannot be negative (got {self.epochs}; 0 keeps the initial gates)")
        require(self.batch_size >= 2, f"AAT-BP's contrastive loss needs batches of 2 or more (got {self.batch_size})")
        require(self.lr > 0, f"AAT-BP's learning rate must be positive (got {self.lr})")
        require(0 < self.threshold < 1, f"AAT-BP's gate threshold must be in (0, 1) (got {self.threshold})")

    def to_dict(self) -> dict:
        return asdict(self)


def threshold_mask(gates: torch.Tensor, threshold: float, target) -> HeadMask:
    """Binary mask: heads whose gate is below ``threshold`` are ablated."""
    return HeadMask.from_tensor((gates.detach().cpu() >= threshold).float(), target)


def _epoch_batches(captions_of: Sequence[list[int]], batch_size: int, seed: int, epoch: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled ``(image indices, caption indices)`` batches: one random caption per image, fixed by seed+epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    images = [i for i, caps in enumerate(captions_of) if caps]
    order = [images[i] for i in torch.randperm(len(images), generator=generator).tolist()]
    picks = [captions_of[i][int(torch.randint(len(captions_of[i]), (1,), generator=generator))] for i in order]
    return [(torch.tensor(order[i:i + batch_size]), torch.tensor(picks[i:i + batch_size]))
            for i in range(0, len(order), batch_size)]


def _gather_rows(local: torch.Tensor, n_rows: int, distributed: Distributed) -> torch.Tensor:
    """All rows of a batch split ``rows[rank::world_size]`` over ranks, in batch order; only this rank's rows carry
    gradients. The loss of the whole batch back-propagated on every rank and the gradients summed over ranks is then
    the gradient of one process (each rank contributes the chain-rule terms of its own rows)."""
    if not distributed.active:
        return local
    world, size = distributed.world_size, -(-n_rows // distributed.world_size)
    padded = torch.zeros(size, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[:len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts[distributed.rank] = torch.cat([local, padded[len(local):]])  # own rows keep their gradient
    rows = torch.cat([part[:len(range(rank, n_rows, world))] for rank, part in enumerate(parts)])
    order = torch.cat([torch.arange(rank, n_rows, world) for rank in range(world)])
    return rows[torch.argsort(order).to(rows.device)]


def graph_bytes(evaluator: MaskEvaluator, rows: int, checkpointing: bool) -> int:
    """Estimated bytes of one AAT-BP step's autograd graph over ``rows`` images: every layer's saved activations
    (one :func:`~clipheads.search.memory.forward_bytes` per layer), or with activation checkpointing the input of
    every layer plus the activations of the one layer recomputed in the backward pass."""
    backend = evaluator.backend
    _, tokens, width = evaluator.residual(0).shape
    itemsize = torch.empty((), dtype=backend.dtype).element_size()
    layer = forward_bytes(rows, tokens, width, evaluator.n_heads, itemsize)
    if not checkpointing:
        return evaluator.n_layers * layer
    return evaluator.n_layers * rows * tokens * width * itemsize + layer


def plan_checkpointing(evaluator: MaskEvaluator, batch_size: int, available: int | None = None) -> bool:
    """Whether AAT-BP checkpoints its activations: only when the graph of a batch would not fit in ``available``
    bytes (default: what the evaluator's budget leaves after its cache; no budget: never checkpoint).

    Raises:
        ClipHeadsError: even the checkpointed graph of one batch does not fit.
    """
    budget = evaluator.plan.budget_bytes
    if budget is None and available is None:
        return False
    rows = -(-min(batch_size, evaluator.n_images) // evaluator.distributed.world_size)
    left = budget - evaluator.plan.cache_bytes if available is None else available
    if graph_bytes(evaluator, rows, False) <= left:
        return False
    if graph_bytes(evaluator, rows, True) <= left:
        return True
    raise ClipHeadsError(f"memory budget too small for AAT-BP: after the caches {format_size(max(0, left))} are "
                         f"left, and a batch of {rows} images needs {format_size(graph_bytes(evaluator, rows, True))} "
                         "even with activation checkpointing; give a larger budget or a smaller --batch-size")


def _gated_features(backend, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Image features of the residual ``x`` entering layer 0 through the (hooked) layers; with ``checkpointing`` each
    layer's activations are recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant: the same
    arithmetic, so the same gradients)."""
    if not checkpointing:
        return backend.pool(backend.run_layers(x))
    for layer in range(backend.n_layers):
        x = checkpoint(backend.run_layers, x, layer, layer + 1, use_reentrant=False)
    return backend.pool(x)


def bp_search(evaluator: MaskEvaluator, text_features: torch.Tensor, text_to_image: torch.Tensor | Sequence[int],
              config: BPConfig, out: RunFolder | None = None, report: MaskEvaluator | None = None,
              allow_same_split: bool = False, seed_ranking: ScanResult | None = None,
              checkpointing: bool | None = None) -> SearchResult:
    """Learn head gates on the evaluator's images and their captions; checkpointed every epoch.

    Under ``torchrun`` every batch is split over the ranks (each encodes its rows, the features are gathered and the
    gate gradients summed), so the result equals one process up to floating-point summation order.

    Args:
        evaluator: the search split (its cached layer-0 residuals are the training images; it also scores the
            thresholded mask after every epoch).
        text_features: ``[N_txt, D]`` cached caption features; ``text_to_image``: ``[N_txt]`` image of each caption.
        seed_ranking: a scan or attribution estimate (:meth:`AttributionResult.as_scan`); the heads it ranks
            harmful start with gate 0.5 (logit 0) instead of ``sigmoid(init_logit)``.
        checkpointing: recompute each layer's activations in the backward pass instead of keeping them (the same
            gradients); default: :func:`plan_checkpointing` from the evaluator's memory budget.

    Raises:
        ClipHeadsError: the evaluator's budget does not hold the checkpointed graph of one batch.
    """
    check_splits(evaluator, report, allow_same_split)
    require(not evaluator.sharded, "AAT-BP needs every image's search cache on every rank (its batches are random "
            "rows of it); build its MaskEvaluator without shard_images")
    if checkpointing is None:
        checkpointing = plan_checkpointing(evaluator, config.batch_size)
    log.info("AAT-BP: activation checkpointing %s", "on" if checkpointing else "off")
    started = time.perf_counter()
    backend = evaluator.backend
    captions_of = captions_by_image(text_to_image, evaluator.n_images)
    text_features = text_features.detach().to(backend.device, torch.float32)
    n_total = evaluator.n_layers * evaluator.n_heads

    initial = torch.full((evaluator.n_layers, evaluator.n_heads), float(config.init_logit))
    for label in seed_ranking.harmful() if seed_ranking is not None else []:
        initial[parse_head(label)] = 0.0
    logits = initial.to(backend.device).requires_grad_(True)
    distributed = evaluator.distributed
    optimizer = torch.optim.Adam([logits], lr=config.lr)
    history: list[dict] = []
    start_epoch, seconds = 0, 0.0
    saved = out.load_tensors(CHECKPOINT) if out else None
    if saved is not None:
        missing = sorted({"logits", "optimizer", "epoch", "history", "seconds"} - set(saved))
        if missing or not isinstance(saved["logits"], torch.Tensor) or saved["logits"].shape != logits.shape:
            raise out.damaged(CHECKPOINT, f"missing {', '.join(missing)}" if missing else
                              f"gate logits that are not a {tuple(logits.shape)} tensor")
        with torch.no_grad():
            logits.copy_(saved["logits"])
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch, history, seconds = int(saved["epoch"]), list(saved["history"]), float(saved["seconds"])
        log.info("AAT-BP: resuming at epoch %d", start_epoch)

    with frozen_parameters(backend.model):
        epochs = tqdm(range(start_epoch, config.epochs), desc="AAT-BP epoch", unit="epoch", initial=start_epoch,
                      total=config.epochs, disable=not (evaluator.progress and distributed.is_main), leave=False)
        for epoch in epochs:
            losses, contrastive = [], []
            for images, captions in _epoch_batches(captions_of, config.batch_size, config.seed, epoch):
                gates = torch.sigmoid(logits)
                mine = images[distributed.rank::distributed.world_size]  # this rank's rows, as _gather_rows expects
                # the backward pass inside the hooks too: checkpointed layers run again in it
                with ablate(backend, HeadMask.from_tensor(gates, backend), op=evaluator.operator):
                    features = _gated_features(backend, evaluator.residual_rows(0, mine), checkpointing)
                    features = _gather_rows(features.float(), len(images), distributed)
                    task = clip_loss(features, text_features[captions.to(text_features.device)],
                                     backend.logit_scale)
                    penalty = config.beta * (1 - gates).mean()
                    optimizer.zero_grad()
                    (task + penalty if distributed.is_main else task).backward()  # the penalty's gradient once
                if distributed.active:
                    dist.all_reduce(logits.grad)
                optimizer.step()
                losses.append(task.item() + penalty.item())
                contrastive.append(task.item())
            gates = torch.sigmoid(logits.detach())
            mask = threshold_mask(gates, config.threshold, backend)
            metric = evaluator.evaluate(mask, desc=f"AAT-BP epoch {epoch + 1}/{config.epochs}")
            history.append({"epoch": epoch, "loss": sum(losses) / len(losses),
                            "contrastive": sum(contrastive) / len(contrastive), "mean_gate": float(gates.mean()),
                            "n_ablated": mask.n_ablated, "metric": metric})
            log.info("AAT-BP epoch %d: loss %.4f, %d heads below threshold, %s %.4f", epoch, history[-1]["loss"],
                     mask.n_ablated, evaluator.objective.name, metric)
            seconds += time.perf_counter() - started
            started = time.perf_counter()
            if out is not None:
                out.save_tensors({"logits": logits.detach().cpu(), "optimizer": optimizer.state_dict(),
                                  "epoch": epoch + 1, "history": history, "seconds": seconds}, CHECKPOINT)
                out.write_history(history)

    gates = torch.sigmoid(logits.detach()).cpu()
    mask = threshold_mask(gates, config.threshold, backend)
    metric = evaluator.evaluate(mask)
    result = SearchResult("bp", mask, evaluator.objective.name, evaluator.operator.describe(), config.beta,
                          evaluator.split, metric, evaluator.baseline, fitness(metric, mask.n_ablated, n_total,
                                                                               config.beta),
                          evaluations=evaluator.n_evaluated, history=history,
                          wall_seconds=seconds + time.perf_counter() - started, gates=gates,
                          extra={"config": config.to_dict(), "cache_plan": evaluator.plan.to_dict(),
                                 "activation_checkpointing": checkpointing})
    report_heldout(result, report)
    write_result(result, out)
    return result
