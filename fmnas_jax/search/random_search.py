"""Random search: uniform genomes of the space, asked for in batches, until the budget is spent (the baseline)."""

from __future__ import annotations

import math

import numpy as np

from fmnas_jax.genome import Genome, SearchSpace, random_genome
from fmnas_jax.search.base import ClimbResult, Objective, Step

MAX_ROUNDS = 100_000  # a guard for an objective that never runs out


def random_search(space: SearchSpace, objective: Objective, rng: np.random.Generator, seen: dict[Genome, float]) -> ClimbResult:
    """Sample new genomes until the objective is exhausted; the best of `seen` and the samples wins."""
    scores = dict(seen)
    path = [Step(0, i, g, f, "start") for i, (g, f) in enumerate(seen.items())]
    for _ in range(MAX_ROUNDS):
        if objective.exhausted:
            break
        batch = [random_genome(space, rng) for _ in range(max(1, objective.parallelism))]
        batch = [g for g in dict.fromkeys(batch) if g not in scores]
        for g, f in zip(batch, objective(batch), strict=True):
            scores[g] = f
            path.append(Step(0, len(path), g, f, "sample"))
    best = max(scores, key=lambda g: scores[g]) if scores else None
    if best is None or not math.isfinite(scores[best]):
        raise RuntimeError("random search evaluated no genome successfully")
    return ClimbResult(best, scores[best], tuple(path))
