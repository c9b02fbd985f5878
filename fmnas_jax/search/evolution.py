"""Regularized (aging) evolution (Real et al., 2019), the standard NAS baseline, in ask/tell form.

Each child: sample `tournament_size` members of the population uniformly, mutate one gene of the
fittest; when its result is told it joins the population and the oldest member dies, however fit.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from fmnas_jax.genome import Genome, SearchSpace, mutate
from fmnas_jax.search.base import ClimbResult, Objective, Proposals, SearchConfig, Step, Strategy, drive

MAX_DRAWS = 1000  # tournaments for one child not seen yet


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
        return RegularizedEvolution(space, rng, self.tournament_size, given.known, given.population)


class RegularizedEvolution:
    """Aging evolution over a population that is given evaluated (`known`) or asked first (`population`)."""

    def __init__(self, space: SearchSpace, rng: np.random.Generator, tournament_size: int, known: dict[Genome, float] | None = None,
                 population: list[Genome] | tuple[Genome, ...] = ()) -> None:  # fmt: skip
        if not known and not population:
            raise ValueError("regularized evolution needs a starting population")
        self.space, self.rng, self.tournament_size = space, rng, tournament_size
        self.alive: deque[list] = deque([g, f] for g, f in (known or {}).items())  # [genome, fitness], oldest first
        self.size = len(self.alive) + len(population)
        self.path = [Step(0, i, g, f, "start") for i, (g, f) in enumerate((known or {}).items())]
        self._population, self._members = list(population), set(population)
        self._seen = set(known or {}) | set(population)
        self._best: Genome | None = max(known, key=lambda g: known[g]) if known else None
        self._best_f = known[self._best] if known else -math.inf
        self.done = False

    def ask(self) -> Genome | None:
        if self._population:
            return self._population.pop(0)
        if not self.alive:
            return None  # the population's first results are awaited
        for _ in range(MAX_DRAWS):
            picks = self.rng.choice(len(self.alive), size=min(self.tournament_size, len(self.alive)), replace=False)
            parent = max((self.alive[int(i)] for i in picks), key=lambda m: m[1])[0]
            child = mutate(parent, self.space, self.rng)
            if child not in self._seen:
                self._seen.add(child)
                return child
        return None

    def tell(self, genome: Genome, fitness: float) -> None:
        member = next((m for m in self.alive if m[0] == genome), None)
        if member is not None:  # a higher rung's result for a living member
            member[1] = max(member[1], fitness)
        elif genome in self._members:
            self.alive.append([genome, fitness])
            self.path.append(Step(0, len(self.path), genome, fitness, "start"))
        else:
            self.alive.append([genome, fitness])
            if len(self.alive) > self.size:
                self.alive.popleft()  # aging: the oldest dies, however fit
            self.path.append(Step(0, len(self.path), genome, fitness, "child"))
        if fitness > self._best_f:
            self._best, self._best_f = genome, fitness

    def stop(self, why: str) -> None:
        self.done = True

    def result(self) -> ClimbResult:
        if self._best is None:
            raise RuntimeError("regularized evolution evaluated no genome")
        return ClimbResult(self._best, self._best_f, tuple(self.path))


def regularized_evolution(
    space: SearchSpace, objective: Objective, rng: np.random.Generator, population: dict[Genome, float], tournament_size: int
) -> ClimbResult:
    """Evolve from the evaluated `population` (genome -> fitness, oldest first) until the objective is exhausted."""
    if not population:
        raise ValueError("regularized evolution needs an evaluated starting population")
    return drive(RegularizedEvolution(space, rng, tournament_size, population), objective)
