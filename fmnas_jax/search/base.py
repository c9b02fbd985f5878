"""What every strategy shares: its settings, the objective it calls, and the path it records.

Strategies see genomes and fitness values only. The objective they are handed decides
whether a genome is trained or read from the store, and reports when the budget is spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fmnas_jax.cost import parse_duration
from fmnas_jax.genome import Genome

STRATEGIES = ("hillclimb", "table", "random", "evolution")
FIDELITY_MODES = ("none", "halving")
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
class SearchConfig:
    """Population, strategy and budget; see conf/search/*.yaml."""

    strategy: str = "hillclimb"
    seed: int = 0
    population_size: int = 20
    budget: int = 30
    move: str = "first"
    patience: int = 2
    max_restarts: int = 10
    tournament_size: int = 5
    time_budget: str | None = None  # the whole job (search and final retrain): 600, '12m', '1.5h'; null = no limit
    final_share: float = 0.5  # the most of time_budget the search keeps back for the winner's retrain
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    def __post_init__(self) -> None:
        if self.time_budget is not None:
            object.__setattr__(self, "time_budget", str(self.time_budget))
            try:
                parse_duration(self.time_budget)
            except ValueError as e:
                raise ValueError(f"search.time_budget: {e}") from None
        if not 0.0 < self.final_share < 1.0:
            raise ValueError(f"search.final_share {self.final_share} must be between 0 and 1 (exclusive)")
        if self.tournament_size < 1:
            raise ValueError(f"search.tournament_size {self.tournament_size} must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"search.strategy {self.strategy!r} is not one of {list(STRATEGIES)}")
        if self.move not in MOVES:
            raise ValueError(f"search.move {self.move!r} is not one of {list(MOVES)}")
        if self.population_size < 1:
            raise ValueError(f"search.population_size {self.population_size} must be >= 1")
        if self.budget < 0:
            raise ValueError(f"search.budget {self.budget} must be >= 0")
        if self.patience < 1 or self.max_restarts < 0:
            raise ValueError(f"search.patience {self.patience} must be >= 1 and search.max_restarts {self.max_restarts} >= 0")


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
    move: str  # start | left | right | improve | optimum | budget


@dataclass(frozen=True)
class ClimbResult:
    best: Genome
    best_fitness: float
    path: tuple[Step, ...]
