"""AAT strategies for the demo: single-head scan, greedy selection, AAT-GA and AAT-BP over one retrieval set.

Evaluation caches the residual stream entering every layer once (unablated), so a mask whose first ablated layer
is ``l`` re-runs only layers ``l..`` and the pooling; results are memoised by mask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipheads.demo.data import RetrievalSet
from clipheads.heads import head_label
from clipheads.interventions import HeadMask, ablate
from clipheads.models import CLIPBackend
from clipheads.world import retrieval_metrics


class MaskEvaluator:
    """Mean-R (percent) of a retrieval set under any head mask, with cached residuals and a memo."""

    def __init__(self, backend: CLIPBackend, data: RetrievalSet, op: str = "identity", batch_size: int = 500):
        self.backend, self.data, self.op, self.batch_size = backend, data, op, batch_size
        self.memo: dict[bytes, float] = {}
        with torch.inference_mode():
            self.residuals = []  # per batch: [L+1] residual streams entering each layer (last = after the last)
            for start in range(0, len(data), batch_size):
                x = backend.embed(data.pixels[start:start + batch_size].to(backend.device, backend.dtype))
                stream = [x]
                for layer in range(backend.n_layers):
                    x = backend.run_layers(x, layer, layer + 1)
                    stream.append(x)
                self.residuals.append(stream)

    @torch.inference_mode()
    def features(self, mask: HeadMask) -> torch.Tensor:
        first = min(mask.layers, default=self.backend.n_layers)
        out = []
        with ablate(self.backend, mask, op=self.op):
            for stream in self.residuals:
                x = self.backend.run_layers(stream[first], first)
                out.append(F.normalize(self.backend.pool(x).float(), dim=-1).cpu())
        return torch.cat(out)

    def metrics(self, mask: HeadMask) -> dict[str, float]:
        return retrieval_metrics(self.features(mask), self.data.text_features, self.data.text_to_image.tolist())

    def score(self, mask: HeadMask) -> float:
        key = mask.key()
        if key not in self.memo:
            self.memo[key] = 100 * self.metrics(mask)["mean_recall"]
        return self.memo[key]


def single_head_scan(evaluator: MaskEvaluator, progress: bool = True) -> torch.Tensor:
    """``[L, H]`` change of mean-R when each head alone is ablated (positive = ablating it helps)."""
    backend = evaluator.backend
    vanilla = evaluator.score(HeadMask.ones(backend))
    deltas = torch.zeros(backend.n_layers, backend.n_heads)
    heads = [(layer, head) for layer in range(backend.n_layers) for head in range(backend.n_heads)]
    for layer, head in tqdm(heads, desc="single-head scan", disable=not progress, leave=False):
        deltas[layer, head] = evaluator.score(HeadMask.from_heads([(layer, head)], backend)) - vanilla
    return deltas


def greedy_selection(evaluator: MaskEvaluator, candidates: list[tuple[int, int]], max_heads: int = 8
                     ) -> tuple[HeadMask, list[dict]]:
    """Add, one at a time, the candidate head that raises mean-R most; stop when none does."""
    backend = evaluator.backend
    mask = HeadMask.ones(backend)
    best = evaluator.score(mask)
    history = [{"heads": [], "score": best}]
    for _ in range(max_heads):
        trials = []
        for layer, head in candidates:
            if mask.gates[layer, head] == 0:
                continue
            trial = HeadMask(mask.gates.clone(), mask.architecture)
            trial.gates[layer, head] = 0
            trials.append((evaluator.score(trial), trial))
        if not trials:
            break
        score, trial = max(trials, key=lambda t: t[0])
        if score <= best:
            break
        best, mask = score, trial
        history.append({"heads": mask.ablated, "score": best})
    return mask, history


@dataclass
class GAConfig:
    population: int = 24
    generations: int = 12
    beta: float = 5.0  # mean-R points per fraction of heads ablated
    elite: int = 4
    crossover: float = 0.7
    mutation: float = 0.03
    init_heads: int = 2
    seed: int = 0


@dataclass
class GAResult:
    mask: HeadMask
    fitness: float
    score: float
    history: list[dict] = field(default_factory=list)


def genetic_search(evaluator: MaskEvaluator, config: GAConfig, seeds: list[tuple[int, int]] | None = None,
                   progress: bool = True) -> GAResult:
    """AAT-GA over binary masks: fitness = mean-R - beta x (fraction of heads ablated); deterministic for a seed."""
    backend = evaluator.backend
    shape = (backend.n_layers, backend.n_heads)
    n_heads = shape[0] * shape[1]
    rng = random.Random(config.seed)

    def fitness(genome: tuple[int, ...]) -> float:
        mask = HeadMask(torch.tensor(genome, dtype=torch.float32).view(shape), backend.architecture)
        return evaluator.score(mask) - config.beta * (n_heads - sum(genome)) / n_heads

    def random_genome() -> tuple[int, ...]:
        genome = [1] * n_heads
        pool = [layer * shape[1] + head for layer, head in seeds] if seeds else list(range(n_heads))
        for index in rng.sample(pool, min(config.init_heads, len(pool))):
            genome[index] = 0
        return tuple(genome)

    population = [tuple([1] * n_heads)] + [random_genome() for _ in range(config.population - 1)]
    history = []
    for generation in tqdm(range(config.generations), desc="AAT-GA", disable=not progress, leave=False):
        ranked = sorted(population, key=fitness, reverse=True)
        history.append({"generation": generation, "best_fitness": fitness(ranked[0]),
                        "mean_fitness": sum(map(fitness, ranked)) / len(ranked),
                        "best_heads": n_heads - sum(ranked[0])})
        parents = ranked[: max(2, config.population // 2)]
        children = ranked[: config.elite]
        while len(children) < config.population:
            a, b = rng.sample(parents, 2)
            child = [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)] \
                if rng.random() < config.crossover else list(a)
            child = [1 - g if rng.random() < config.mutation else g for g in child]
            children.append(tuple(child))
        population = children
    best = max(population, key=fitness)
    mask = HeadMask(torch.tensor(best, dtype=torch.float32).view(shape), backend.architecture)
    return GAResult(mask, fitness(best), evaluator.score(mask), history)


@dataclass
class BPConfig:
    steps: int = 150
    batch_size: int = 128
    lr: float = 0.1
    beta: float = 0.05  # weight of mean(1 - gate)
    init_logit: float = 2.0
    threshold: float = 0.5
    seed: int = 0


def backprop_gates(backend: CLIPBackend, train: RetrievalSet, config: BPConfig, op: str = "identity",
                   progress: bool = True) -> tuple[HeadMask, torch.Tensor, list[float]]:
    """AAT-BP: one gate logit per head, learned with the model frozen (contrastive loss on the pairs of ``train``
    against its cached text features, plus ``beta * mean(1 - gate)``), then thresholded. Returns mask, gates and
    the loss curve."""
    torch.manual_seed(config.seed)
    logits = torch.full((backend.n_layers, backend.n_heads), config.init_logit, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=config.lr)
    frozen = [p for p in backend.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    first_caption = torch.zeros(len(train), dtype=torch.long)
    for text_index, image_index in reversed(list(enumerate(train.text_to_image.tolist()))):
        first_caption[image_index] = text_index
    text_features = train.text_features[first_caption]
    scale = backend.logit_scale
    losses = []
    generator = torch.Generator().manual_seed(config.seed)
    try:
        for _ in tqdm(range(config.steps), desc="AAT-BP", disable=not progress, leave=False):
            idx = torch.randperm(len(train), generator=generator)[: config.batch_size]
            gates = torch.sigmoid(logits)
            with ablate(backend, HeadMask.from_tensor(gates, backend), op=op):
                image = F.normalize(backend.encode_image(train.pixels[idx]).float(), dim=-1)
            logits_it = scale * image @ text_features[idx].T
            labels = torch.arange(len(idx))
            loss = (F.cross_entropy(logits_it, labels) + F.cross_entropy(logits_it.T, labels)) / 2
            loss = loss + config.beta * (1 - gates).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    gates = torch.sigmoid(logits.detach())
    mask = HeadMask((gates >= config.threshold).float(), backend.architecture)
    return mask, gates, losses


def top_heads(deltas: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads whose ablation helps most (largest positive deltas first)."""
    order = deltas.flatten().argsort(descending=True)[:k].tolist()
    return [divmod(i, deltas.shape[1]) for i in order]


def describe_heads(heads: list[tuple[int, int]]) -> str:
    return ", ".join(head_label(layer, head) for layer, head in heads) or "none"
