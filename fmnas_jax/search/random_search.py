"""Random search: uniform genomes of the space until the budget is spent (the baseline), in ask/tell form."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fmnas_jax.genome import Genome, SearchSpace, fresh_genome
from fmnas_jax.search.base import ClimbResult, Objective, Proposals, SearchConfig, Step, Strategy, best_of, drive

MAX_DRAWS = 1000  # draws for one genome not seen yet (a nearly exhausted small space gives up)


@dataclass(frozen=True)
class RandomConfig(SearchConfig):
    """search=random: uniform random genomes of the space (the baseline); no settings of its own."""

    strategy: str = "random"

    def make(self, space: SearchSpace, rng: np.random.Generator, given: Proposals) -> Strategy:
        return RandomSearch(space, rng, given.known, given.population)


class RandomSearch:
    """Uniform random genomes (first the given population, then fresh draws never asked before)."""

    def __init__(self, space: SearchSpace, rng: np.random.Generator, known: dict[Genome, float] | None = None,
                 population: list[Genome] | tuple[Genome, ...] = ()) -> None:  # fmt: skip
        self.space, self.rng = space, rng
        self.scores: dict[Genome, float] = dict(known or {})
        self.path = [Step(0, i, g, f, "start") for i, (g, f) in enumerate(self.scores.items())]
        self._population, self._asked = list(population), set(self.scores) | set(population)
        self.done = False

    def ask(self) -> Genome | None:
        if self._population:
            return self._population.pop(0)
        g = fresh_genome(self.space, self.rng, self._asked, draws=MAX_DRAWS)
        if g is None:
            self.done = True
        else:
            self._asked.add(g)
        return g

    def tell(self, genome: Genome, fitness: float) -> None:
        if genome not in self.scores:
            self.path.append(Step(0, len(self.path), genome, fitness, "sample"))
        self.scores[genome] = max(self.scores.get(genome, -math.inf), fitness)

    def stop(self, why: str) -> None:
        self.done = True

    def result(self) -> ClimbResult:
        return best_of(self.scores, self.path, "random search")


def random_search(space: SearchSpace, objective: Objective, rng: np.random.Generator, seen: dict[Genome, float]) -> ClimbResult:
    """Sample new genomes until the objective is exhausted; the best of `seen` and the samples wins."""
    return drive(RandomSearch(space, rng, seen), objective)
