"""What every strategy shares: its settings, the ask/tell interface, the synchronous driver, the path it records.

Strategies see genomes and fitness values only (evosax's ask -> evaluate -> tell): `ask()` proposes the
next genome (None: nothing until more results arrive), `tell(genome, fitness)` reports a result (again,
higher, when a genome reaches a higher rung). Who evaluates is not their business: `drive` asks a batch
of the objective's parallelism and tells its fitness values (synchronous rounds); the asynchronous
scheduler (fmnas_jax.scheduler) asks whenever a worker is free. Which genome is trained and which is
read back from the store is decided behind the objective, by the evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fmnas_jax.cost import parse_duration
from fmnas_jax.genome import Genome, SearchSpace

STRATEGIES = ("hillclimb", "table", "random", "evolution", "optuna")
SAMPLERS = ("tpe", "nsga2", "random")  # search=optuna
FIDELITY_MODES = ("none", "halving", "asha")
MOVES = ("first", "steepest")


@dataclass(frozen=True)
class Rung:
    """One cheaper budget of a multi-fidelity search: epochs and training images (null = all)."""

    epochs: int = 1
    train_size: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.train_size is not None and self.train_size < 10):
            raise ValueError(f"search.fidelity rung epochs {self.epochs} must be >= 1 and train_size {self.train_size} null or >= 10")


@dataclass(frozen=True)
class FidelityConfig:
    """Successive halving: `rungs` (cheapest first) below the search's own budget, the best 1/eta promoted each time."""

    mode: str = "none"
    eta: int = 3
    rungs: tuple[Rung, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in FIDELITY_MODES:
            raise ValueError(f"search.fidelity.mode {self.mode!r} is not one of {list(FIDELITY_MODES)}")
        if self.eta < 2:
            raise ValueError(f"search.fidelity.eta {self.eta} must be >= 2")
        if self.mode == "halving" and not self.rungs:
            raise ValueError("search.fidelity.mode 'halving' needs at least one rung in search.fidelity.rungs")


@dataclass(frozen=True)
class Proposals:
    """What a strategy starts from: the evaluated population (`known`, `start`) or the population to ask first,
    `eager` (asynchronous rungs: a climb moves to any better genome it asked), and `foreign`, other searches'
    results a model-based sampler may learn from."""

    known: dict[Genome, float] | None = None
    start: Genome | None = None
    population: Sequence[Genome] = ()
    eager: bool = False
    foreign: dict[Genome, float] | None = None


@dataclass(frozen=True)
class SearchConfig:
    """Population, budget and rungs, which every strategy shares; each strategy's own settings are in its
    subclass below (conf/search/<strategy>.yaml holds exactly those), chosen by `strategy`."""

    strategy: str = "hillclimb"
    seed: int = 0
    population_size: int = 20
    budget: int | None = 30  # new evaluations after the population; null = as many as the time budget allows
    time_budget: str | None = None  # the whole job (search and final retrain): 600, '12m', '1.5h'; null = no limit
    final_share: float = 0.5  # the most of time_budget the search keeps back for the winner's retrain
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    # Before the winner is chosen, the best `confirm` genomes of the top rung are evaluated again at `confirm_seeds`
    # more seeds (seed + 1, ...: initialisation, shuffling and split); the winner is the best mean fitness. 0 = off.
    confirm: int = 0
    confirm_seeds: int = 1

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_CONFIGS:
            raise ValueError(f"search.strategy {self.strategy!r} is not one of {list(STRATEGIES)}")
        if type(self) is not STRATEGY_CONFIGS[self.strategy]:
            wanted = STRATEGY_CONFIGS[self.strategy].__name__
            raise ValueError(f"search.strategy {self.strategy!r} takes {wanted}, not {type(self).__name__}: "
                             f"choose the strategy with search={self.strategy} (its settings file), not search.strategy")  # fmt: skip
        if self.time_budget is not None:
            object.__setattr__(self, "time_budget", str(self.time_budget))
            try:
                parse_duration(self.time_budget)
            except ValueError as e:
                raise ValueError(f"search.time_budget: {e}") from None
        if not 0.0 < self.final_share < 1.0:
            raise ValueError(f"search.final_share {self.final_share} must be between 0 and 1 (exclusive)")
        if self.population_size < 1:
            raise ValueError(f"search.population_size {self.population_size} must be >= 1")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"search.budget {self.budget} must be >= 0")
        if self.confirm < 0 or self.confirm == 1 or self.confirm_seeds < 1:
            raise ValueError(f"search.confirm {self.confirm} must be 0 (off) or >= 2 (the genomes compared again), "
                             f"and search.confirm_seeds {self.confirm_seeds} >= 1")  # fmt: skip
        if self.confirm and self.strategy == "table":
            raise ValueError("search.confirm is for the strategies that train (search=table climbs the stored table): set it to 0")
        if self.budget is None and self.time_budget is None:
            raise ValueError("search.budget and search.time_budget are both null: the search would never end; set one (or both)")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        """This strategy, ready to ask."""
        raise NotImplementedError


@dataclass(frozen=True)
class HillClimbConfig(SearchConfig):
    """search=hillclimb: moves of `radius` genes (one by default), first or steepest improvement, random restarts."""

    strategy: str = "hillclimb"
    move: str = "first"  # first | steepest improvement
    patience: int = 2  # stop after this many restarts in a row without improvement
    max_restarts: int = 10
    # The share of the climb's asks that sample a fresh random genome instead of a neighbour; the climb jumps to
    # one whose result beats its current point (a climb stuck in one basin still sees the rest of the space). 0 = off.
    explore: float = 0.0
    # The least fitness gain that moves the climb (0: any gain). A gain inside the top rung's seed noise is luck as
    # often as progress; with a threshold the climb stops at such a point and restarts instead of chasing noise.
    min_gain: float = 0.0
    # With rungs: the least gain at each rung below the top, cheapest first (one per search.fidelity rung), for
    # comparisons made at that rung (the current point's); min_gain is then the top rung's. A cheap rung's seed
    # noise is larger (the fidelity study: 1.97, 1.69 and 0.80 points), so is the gain worth a move. Empty: min_gain
    # at every rung.
    min_gain_rungs: tuple[float, ...] = ()
    # The most one-gene moves between a point and its candidates: 1 = one gene changed; 2 = up to two genes (or one
    # gene by two steps). A one-gene neighbourhood is flat within the top rung's seed noise at the main job's fidelity
    # (docs/benchmarks.md): a wider one gives candidates whose differences the rungs can tell apart.
    radius: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.move not in MOVES:
            raise ValueError(f"search.move {self.move!r} is not one of {list(MOVES)}")
        if not 0.0 <= self.explore < 1.0:
            raise ValueError(f"search.explore {self.explore} must be >= 0 and < 1 (the share of asks that sample at random)")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"search.min_gain {self.min_gain} must be >= 0 and < 1 (a gain in fitness, accuracy as a fraction)")
        if any(not 0.0 <= g < 1.0 for g in self.min_gain_rungs):
            raise ValueError(f"search.min_gain_rungs {list(self.min_gain_rungs)}: each must be >= 0 and < 1 (a gain in fitness)")
        cheap = len(self.fidelity.rungs) if self.fidelity.mode != "none" else 0
        if self.min_gain_rungs and len(self.min_gain_rungs) != cheap:
            raise ValueError(f"search.min_gain_rungs {list(self.min_gain_rungs)} needs one gain per rung below the top: "
                             f"search.fidelity has {cheap} (mode {self.fidelity.mode!r}); [] = min_gain at every rung")  # fmt: skip
        if not 1 <= self.radius <= 3:
            raise ValueError(f"search.radius {self.radius} must be 1, 2 or 3 (the most one-gene moves from a point to its candidates)")
        if self.patience < 1 or self.max_restarts < 0:
            raise ValueError(f"search.patience {self.patience} must be >= 1 and search.max_restarts {self.max_restarts} >= 0")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        from fmnas_jax.search.hillclimb import HillClimber

        return HillClimber(space, rng, self, start=given.start, population=given.population, eager=given.eager)


@dataclass(frozen=True)
class TableConfig(SearchConfig):
    """search=table: the paper's climber over the stored table (it trains nothing beyond the population)."""

    strategy: str = "table"
    patience: int = 2
    max_restarts: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patience < 1 or self.max_restarts < 0:
            raise ValueError(f"search.patience {self.patience} must be >= 1 and search.max_restarts {self.max_restarts} >= 0")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        return PopulationOnly(given.population)  # the climb runs over the stored table afterwards


@dataclass(frozen=True)
class RandomConfig(SearchConfig):
    """search=random: uniform random genomes of the space (the baseline); no settings of its own."""

    strategy: str = "random"

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        from fmnas_jax.search.random_search import RandomSearch

        return RandomSearch(space, rng, given.known, given.population)


@dataclass(frozen=True)
class EvolutionConfig(SearchConfig):
    """search=evolution: regularized (aging) evolution with tournaments of `tournament_size`."""

    strategy: str = "evolution"
    tournament_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tournament_size < 1:
            raise ValueError(f"search.tournament_size {self.tournament_size} must be >= 1")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        from fmnas_jax.search.evolution import RegularizedEvolution

        return RegularizedEvolution(space, rng, self.tournament_size, given.known, given.population)


@dataclass(frozen=True)
class OptunaConfig(SearchConfig):
    """search=optuna: one of Optuna's samplers through ask-and-tell (the optuna extra)."""

    strategy: str = "optuna"
    sampler: str = "tpe"  # tpe | nsga2 | random

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"search.sampler {self.sampler!r} is not one of {list(SAMPLERS)}")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        from fmnas_jax.search.optuna_search import OptunaSearch

        return OptunaSearch(space, self.seed, self.sampler, {**(given.foreign or {}), **(given.known or {})}, given.population)


STRATEGY_CONFIGS: dict[str, type[SearchConfig]] = {
    "hillclimb": HillClimbConfig,
    "table": TableConfig,
    "random": RandomConfig,
    "evolution": EvolutionConfig,
    "optuna": OptunaConfig,
}


class Objective(Protocol):
    """Fitness of genomes; may stop paying for new evaluations (then `exhausted` is True)."""

    def __call__(self, genomes: Sequence[Genome]) -> list[float]: ...

    @property
    def exhausted(self) -> bool: ...

    @property
    def parallelism(self) -> int:
        """How many genomes one call evaluates at once; strategies may ask for that many together."""
        ...


@dataclass(frozen=True)
class Step:
    """One point of a climb: restart number, step within it, genome, fitness, and the move made."""

    restart: int
    step: int
    genome: Genome
    fitness: float
    move: str  # start | left | right | improve | jump | optimum | budget | confirm (the winner chosen again, search.confirm)
    #            | best (hill climbing's winner when no climb moved to it)


@dataclass(frozen=True)
class ClimbResult:
    best: Genome
    best_fitness: float
    path: tuple[Step, ...]


class Strategy(Protocol):
    """A search strategy in ask/tell form."""

    def ask(self) -> Genome | None:
        """The next genome to evaluate, or None when nothing can be proposed before more results arrive."""
        ...

    def tell(self, genome: Genome, fitness: float) -> None:
        """A result for a genome this strategy asked for (possibly again, higher, from a higher rung)."""
        ...

    @property
    def done(self) -> bool:
        """The strategy has finished (e.g. hill climbing ran out of restarts): ask nothing more."""
        ...

    def stop(self, why: str) -> None:
        """The evaluations ended for `why` ('budget'): record it in the path."""
        ...

    def result(self) -> ClimbResult: ...


class PopulationOnly:
    """Asks the given genomes and nothing else (the table climber's population, which it then climbs on its own)."""

    def __init__(self, population: Sequence[Genome]) -> None:
        self._queue, self.scores, self.done = list(population), {}, False

    def ask(self) -> Genome | None:
        return self._queue.pop(0) if self._queue else None

    def tell(self, genome: Genome, fitness: float) -> None:
        self.scores[genome] = max(self.scores.get(genome, -math.inf), fitness)

    def stop(self, why: str) -> None:
        self.done = True

    def result(self) -> ClimbResult:
        best = max(self.scores, key=lambda g: self.scores[g]) if self.scores else None
        steps = tuple(Step(0, i, g, f, "start") for i, (g, f) in enumerate(self.scores.items()))
        return ClimbResult(best, self.scores.get(best, -math.inf), steps)  # type: ignore[arg-type]


def best_of(scores: dict[Genome, float], path: Sequence[Step], who: str) -> ClimbResult:
    """The best-scoring genome of a sampling strategy (random search, Optuna); `who` names it if none finished."""
    best = max(scores, key=lambda g: scores[g]) if scores else None
    if best is None or not math.isfinite(scores[best]):
        raise RuntimeError(f"{who} evaluated no genome successfully")
    return ClimbResult(best, scores[best], tuple(path))


def drive(strategy: Strategy, objective: Objective) -> ClimbResult:
    """Synchronous rounds: ask up to the objective's parallelism, evaluate the batch together, tell every fitness."""
    while not strategy.done and not objective.exhausted:
        batch: list[Genome] = []
        while len(batch) < max(1, objective.parallelism) and (g := strategy.ask()) is not None:
            batch.append(g)
        if not batch:
            break
        for g, f in zip(batch, objective(batch), strict=True):
            if math.isfinite(f) or not objective.exhausted:  # -inf once exhausted: never evaluated, nothing to tell
                strategy.tell(g, f)
    if objective.exhausted and not strategy.done:
        strategy.stop("budget")
    return strategy.result()
