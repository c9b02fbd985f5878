"""What every strategy shares: its settings, the objective it calls, and the path it records.

Strategies see genomes and fitness values only. The objective they are handed decides
whether a genome is trained or read from the store, and reports when the budget is spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fmnas_jax.genome import Genome

STRATEGIES = ("hillclimb", "table")
MOVES = ("first", "steepest")


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

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class Step:
    """One point of a climb: restart number, step within it, genome, fitness, and the move made."""

    restart: int
    step: int
    genome: str
    fitness: float
    move: str  # start | left | right | improve | optimum | budget


@dataclass(frozen=True)
class ClimbResult:
    best: str
    best_fitness: float
    path: tuple[Step, ...]
