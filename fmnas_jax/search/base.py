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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fmnas_jax.cost import parse_duration
from fmnas_jax.genome import Genome, SearchSpace

STRATEGIES = ("hillclimb", "table", "random", "evolution", "optuna")  # each module's settings class: fmnas_jax.search.STRATEGY_CONFIGS
FIDELITY_MODES = ("none", "halving", "asha")


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
    `eager` (asynchronous rungs: a climb moves to any better genome it asked), and what the store holds, read when
    called by the strategy that uses it: `foreign`, other searches' results a model-based sampler may learn from, and
    `table`, the stored evaluations at the search's own budget as (genome, params, accuracy, fitness) rows (the
    table climber's)."""

    known: dict[Genome, float] | None = None
    start: Genome | None = None
    population: Sequence[Genome] = ()
    eager: bool = False
    foreign: Callable[[], dict[Genome, float]] | None = None
    table: Callable[[], Sequence[tuple[Genome, int, float, float]]] | None = None


@dataclass(frozen=True)
class SearchConfig:
    """Population, budget and rungs, which every strategy shares; each strategy's own settings are a subclass in
    its module (conf/search/<strategy>.yaml holds exactly those), chosen by `strategy`."""

    strategy: str = "hillclimb"
    seed: int = 0
    population_size: int = 20
    budget: int | None = 30  # new evaluations after the population; null = as many as the time budget allows
    time_budget: str | None = None  # the whole job (search and final retrain): 600, '12m', '1.5h'; null = no limit
    final_share: float = 0.5  # the most of time_budget the search keeps back for the winner's retrain
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    def describe_limits(self) -> str:
        """The population and what ends the search, for the log and the search run's description."""
        limits = [f"time budget {self.time_budget} (search and final retrain)"] * bool(self.time_budget)
        limits += [f"{self.budget} new evaluations after the population"] * bool(self.budget)
        first = ", whichever ends first" if len(limits) > 1 else ""
        return ", ".join([f"population {self.population_size}", *([" and ".join(limits) + first] if limits else [])])

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"search.strategy {self.strategy!r} is not one of {list(STRATEGIES)}")
        own = type(self).__dataclass_fields__["strategy"].default
        if self.strategy != own:
            raise ValueError(f"search.strategy {self.strategy!r} on {type(self).__name__}, the settings of {own!r}: "
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
        if self.budget is None and self.time_budget is None:
            raise ValueError("search.budget and search.time_budget are both null: the search would never end; set one (or both)")

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        """This strategy, ready to ask."""
        raise NotImplementedError


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
    move: str  # start | left | right | improve | optimum | budget | best (hill climbing's winner when no climb moved to it)


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
