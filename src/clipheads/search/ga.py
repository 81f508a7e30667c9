"""AAT-GA: a genetic algorithm over binary head masks, fitness = metric - beta x fraction of heads ablated.

A genome is the sorted tuple of ablated head indices (``layer * n_heads + head``). Generation ``g`` draws its random
numbers from ``Random(f"{seed}:{g}")``, so a run is deterministic for a seed and resumes from a checkpoint (the
population of the next generation) without saving any generator state.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from typing_extensions import TypedDict

from clipheads.errors import require
from clipheads.heads import parse_head
from clipheads.interventions import HeadMask
from clipheads.search import plots
from clipheads.search.engine import MaskEvaluator
from clipheads.search.results import SearchResult, check_splits, fitness, report_heldout, write_result
from clipheads.search.scan import ScanResult
from clipheads.search.state import RunFolder


class _Best(TypedDict):
    genome: list[int]
    fitness: float
    metric: float


class GAState(TypedDict):
    """``state.json`` of AAT-GA: the next generation, every genome scored so far and the best one."""

    generation: int
    population: list[list[int]]
    evaluated: list[tuple[list[int], float]]
    best: _Best | None
    history: list[dict]
    seconds: float

log = logging.getLogger(__name__)

Genome = tuple[int, ...]


@dataclass
class GAConfig:
    """Hyper-parameters of AAT-GA. ``mutation_rate`` is per head (default ``1 / number of heads``)."""

    beta: float = 0.01
    population: int = 32
    generations: int = 20
    elitism: int = 2
    crossover_rate: float = 0.8
    mutation_rate: float | None = None
    tournament: int = 3
    init_rate: float = 0.05  # chance that a head is ablated in a random initial genome
    seed: int = 0
    seed_from_scan: bool = True

    def __post_init__(self) -> None:
        require(self.population >= 2, f"the GA population needs at least 2 masks (got {self.population})")
        require(self.generations >= 1, f"the GA needs at least 1 generation (got {self.generations})")
        require(0 <= self.elitism < self.population,
                f"GA elitism must be between 0 and population - 1 = {self.population - 1} (got {self.elitism})")
        require(self.tournament >= 1, f"the GA tournament needs at least 1 mask (got {self.tournament})")
        for name in ("crossover_rate", "mutation_rate", "init_rate"):
            value = getattr(self, name)
            require(value is None or 0 <= value <= 1, f"GA {name.replace('_', ' ')} must be in [0, 1] (got {value})")

    def to_dict(self) -> dict:
        return asdict(self)


def genome_mask(genome: Genome, shape: tuple[int, int]) -> HeadMask:
    gates = torch.ones(shape[0] * shape[1])
    gates[list(genome)] = 0.0
    return HeadMask(gates.view(shape))


def initial_population(config: GAConfig, n_genes: int, seeded: Sequence[Genome] = ()) -> list[Genome]:
    """The unablated genome, then the seeded genomes (e.g. top-k of a scan, at most half), then random sparse ones."""
    rng = random.Random(f"{config.seed}:init")
    population: list[Genome] = [()]
    population += list(seeded)[: config.population // 2]
    while len(population) < config.population:
        population.append(tuple(i for i in range(n_genes) if rng.random() < config.init_rate))
    return population[: config.population]


def next_generation(population: Sequence[Genome], scores: Sequence[float], config: GAConfig, n_genes: int,
                    rng: random.Random) -> list[Genome]:
    """Elites, then children of tournament-selected parents: uniform crossover and per-head bit-flip mutation."""
    order = sorted(range(len(population)), key=lambda i: -scores[i])  # stable: ties keep population order
    children = [population[i] for i in order[: config.elitism]]
    mutation = config.mutation_rate if config.mutation_rate is not None else 1.0 / n_genes

    def tournament() -> set[int]:
        contenders = [rng.randrange(len(population)) for _ in range(config.tournament)]
        return set(population[max(contenders, key=lambda i: (scores[i], -i))])

    while len(children) < len(population):
        first, second = tournament(), tournament()
        if rng.random() < config.crossover_rate:
            child = {i for i in range(n_genes) if (i in first if rng.random() < 0.5 else i in second)}
        else:
            child = set(first)
        for i in range(n_genes):
            if rng.random() < mutation:
                child ^= {i}
        children.append(tuple(sorted(child)))
    return children


def ga_search(evaluator: MaskEvaluator, config: GAConfig, out: RunFolder | None = None, scan: ScanResult | None = None,
              report: MaskEvaluator | None = None, allow_same_split: bool = False,
              on_generation: Callable[[int, dict], None] | None = None) -> SearchResult:
    """Run AAT-GA on ``evaluator``'s split; checkpoint every generation to ``out`` and resume from it.

    Args:
        scan: a single-head scan, or an attribution estimate (``AttributionResult.as_scan()``); with
            ``config.seed_from_scan`` the initial population holds the masks of its top-k harmful heads.
        report: evaluator of the held-out split for the final report.
        on_generation: called after each generation's checkpoint with ``(generation, state)``.
    """
    check_splits(evaluator, report, allow_same_split)
    started = time.perf_counter()
    shape = (evaluator.n_layers, evaluator.n_heads)
    n_genes = shape[0] * shape[1]
    state = out.load_state(schema=GAState) if out else None
    if state is not None:
        genes = [g for genome in state["population"] + [e[0] for e in state["evaluated"]] for g in genome]
        if any(not 0 <= g < n_genes for g in genes):
            raise out.damaged("state.json", f"a genome names a head outside 0..{n_genes - 1}")
    if state is None:
        seeded = []
        if scan is not None and config.seed_from_scan:
            flat = [parse_head(label)[0] * shape[1] + parse_head(label)[1] for label in scan.harmful()]
            seeded = [tuple(sorted(flat[:k])) for k in range(1, len(flat) + 1)]
        state = {"generation": 0, "population": [list(g) for g in initial_population(config, n_genes, seeded)],
                 "evaluated": [], "best": None, "history": [], "seconds": 0.0}
    for genome, score in state["evaluated"]:
        evaluator.remember(genome_mask(tuple(genome), shape), score)
    evaluated = {tuple(g): s for g, s in state["evaluated"]}
    population = [tuple(g) for g in state["population"]]
    best = state["best"]
    generations = tqdm(range(state["generation"], config.generations), desc="AAT-GA", unit="generation",
                       initial=state["generation"], total=config.generations, leave=False,
                       disable=not (evaluator.progress and evaluator.distributed.is_main))
    for generation in generations:  # the bar's rate gives the time left; each generation's masks get their own bar
        metrics = evaluator.evaluate_many([genome_mask(g, shape) for g in population],
                                          desc=f"AAT-GA generation {generation + 1}/{config.generations}")
        scores = [fitness(m, len(g), n_genes, config.beta) for g, m in zip(population, metrics, strict=True)]
        evaluated.update(zip(population, metrics, strict=True))
        top = max(range(len(population)), key=lambda i: (scores[i], -i))
        if best is None or scores[top] > best["fitness"]:
            best = {"genome": list(population[top]), "fitness": scores[top], "metric": metrics[top]}
        state["history"].append({"generation": generation, "best_fitness": best["fitness"],
                                 "best_metric": best["metric"], "best_n_ablated": len(best["genome"]),
                                 "generation_best": scores[top], "mean_fitness": sum(scores) / len(scores),
                                 "evaluations": len(evaluated)})
        log.info("GA generation %d: best fitness %.4f (%s %.4f, %d heads)", generation, best["fitness"],
                 evaluator.objective.name, best["metric"], len(best["genome"]))
        if generation + 1 < config.generations:
            population = next_generation(population, scores, config, n_genes,
                                         random.Random(f"{config.seed}:{generation}"))
        state.update(generation=generation + 1, population=[list(g) for g in population], best=best,
                     evaluated=[[list(g), s] for g, s in evaluated.items()],
                     seconds=state["seconds"] + time.perf_counter() - started)
        started = time.perf_counter()
        if out is not None:
            out.save_state(state)
            out.write_history(state["history"])
        if on_generation is not None:
            on_generation(generation, state)
    if best is None:  # zero generations: the unablated model
        best = {"genome": [], "fitness": evaluator.baseline, "metric": evaluator.baseline}
    mask = genome_mask(tuple(best["genome"]), shape)
    mask.architecture = evaluator.backend.architecture
    result = SearchResult("ga", mask, evaluator.objective.name, evaluator.operator.describe(), config.beta,
                          evaluator.split, best["metric"], evaluator.baseline, best["fitness"],
                          evaluations=len(evaluated), history=state["history"],
                          wall_seconds=state["seconds"] + time.perf_counter() - started,
                          extra={"config": config.to_dict(), "cache_plan": evaluator.plan.to_dict()})
    report_heldout(result, report)
    write_result(result, out)
    return result


@dataclass
class BetaSweepResult:
    """Best GA mask per beta: metric on the search split and on the held-out split."""

    betas: list[float]
    results: list[SearchResult]

    def to_dict(self) -> dict:
        return {"betas": self.betas, "runs": [{"beta": b, "search_metric": r.search_metric,
                                              "heldout_metric": r.heldout_metric, "n_ablated": r.mask.n_ablated,
                                              "ablated": r.mask.ablated, "fitness": r.fitness}
                                             for b, r in zip(self.betas, self.results, strict=True)]}


def beta_sweep(evaluator: MaskEvaluator, config: GAConfig, betas: Sequence[float], out: RunFolder | None = None,
               scan: ScanResult | None = None, report: MaskEvaluator | None = None,
               allow_same_split: bool = False,
               on_beta: Callable[[int, SearchResult], None] | None = None) -> BetaSweepResult:
    """AAT-GA once per beta (each in ``out/beta_<beta>/``), sharing the evaluator's memo: the metric of a mask
    does not depend on beta. Writes ``beta_sweep.json`` and ``metric_vs_beta.png``. ``on_beta`` is called after
    each beta's search with its index in ``betas`` and its result."""
    results = []
    for index, beta in enumerate(betas):
        run_config = GAConfig(**{**config.to_dict(), "beta": float(beta)})
        sub = None
        if out is not None:
            sub = RunFolder(out.file(f"beta_{beta:g}"), {**out.config, "beta": float(beta), "sweep": None},
                            out.distributed)
        results.append(ga_search(evaluator, run_config, sub, scan, report, allow_same_split))
        if on_beta is not None:
            on_beta(index, results[-1])
    sweep = BetaSweepResult([float(b) for b in betas], results)
    if out is not None and out.distributed.is_main:
        out.write_json("beta_sweep.json", sweep.to_dict())
        plots.plot_beta_curve(sweep.betas, [r.search_metric for r in results], [r.heldout_metric for r in results],
                              out.file("metric_vs_beta.png"), baseline=evaluator.baseline,
                              metric=evaluator.objective.name)
    return sweep
