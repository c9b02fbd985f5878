"""Regularized (aging) evolution (Real et al., 2019), the standard NAS baseline.

Each cycle: sample `tournament_size` members of the population uniformly, mutate one gene of the
fittest, evaluate the child, add it and drop the oldest member. Children are asked for in batches
of the objective's parallelism, each from its own tournament.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from fmnas_jax.genome import Genome, SearchSpace, mutate
from fmnas_jax.search.base import ClimbResult, Objective, Step

MAX_CYCLES = 100_000  # a guard for an objective that never runs out


def regularized_evolution(
    space: SearchSpace, objective: Objective, rng: np.random.Generator, population: dict[Genome, float], tournament_size: int
) -> ClimbResult:
    """Evolve from the evaluated `population` (genome -> fitness, oldest first) until the objective is exhausted."""
    if not population:
        raise ValueError("regularized evolution needs an evaluated starting population")
    alive = deque(population.items())
    best, best_f = max(population.items(), key=lambda kv: kv[1])
    path = [Step(0, i, g, f, "start") for i, (g, f) in enumerate(population.items())]
    seen = set(population)
    for _ in range(MAX_CYCLES):
        if objective.exhausted:
            break
        children = []
        for _ in range(max(1, objective.parallelism)):
            picks = rng.choice(len(alive), size=min(tournament_size, len(alive)), replace=False)
            parent = max((alive[int(i)] for i in picks), key=lambda kv: kv[1])[0]
            child = mutate(parent, space, rng)
            if child not in seen:
                seen.add(child)
                children.append(child)
        for child, f in zip(children, objective(children), strict=True):
            if not math.isfinite(f) and objective.exhausted:
                continue  # not evaluated: the budget ran out before it
            alive.append((child, f))
            alive.popleft()  # aging: the oldest dies, however fit
            path.append(Step(0, len(path), child, f, "child"))
            if f > best_f:
                best, best_f = child, f
    return ClimbResult(best, best_f, tuple(path))
