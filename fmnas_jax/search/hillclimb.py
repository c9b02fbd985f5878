"""Hill climbing in genome space with random restarts (first or steepest improvement)."""

from __future__ import annotations

import math

import numpy as np

from fmnas_jax.genome import Genome, SearchSpace, neighbours, random_genome
from fmnas_jax.search.base import ClimbResult, Objective, SearchConfig, Step


def _climb_once(start: Genome, space: SearchSpace, objective: Objective, rng: np.random.Generator, move: str, restart: int) -> list[Step]:
    """Climb from `start` to a local optimum (or until the budget runs out)."""
    current, f_cur = start, objective([start])[0]
    path = [Step(restart, 0, current, f_cur, "start")]
    while not objective.exhausted:
        nbrs = neighbours(current, space)
        order = rng.permutation(len(nbrs))
        candidates = [nbrs[i] for i in order]
        if move == "steepest":
            scores = objective(candidates)
            best = int(np.argmax(scores))
            nxt, f_nxt = candidates[best], scores[best]
        else:
            nxt, f_nxt = _first_better(candidates, f_cur, objective)
        if nxt is None or f_nxt <= f_cur:
            path.append(Step(restart, len(path), current, f_cur, "budget" if objective.exhausted else "optimum"))
            break
        current, f_cur = nxt, f_nxt
        path.append(Step(restart, len(path), current, f_cur, "improve"))
    else:
        path.append(Step(restart, len(path), current, f_cur, "budget"))
    return path


def _first_better(candidates: list[Genome], f_cur: float, objective: Objective) -> tuple[Genome | None, float]:
    """The first candidate (in order) that beats f_cur, asking in chunks of the objective's parallelism."""
    k = max(1, objective.parallelism)
    for i in range(0, len(candidates), k):
        chunk = candidates[i : i + k]
        for cand, f in zip(chunk, objective(chunk), strict=True):
            if f > f_cur:
                return cand, f
        if objective.exhausted:
            break
    return None, -math.inf


def hill_climb(
    space: SearchSpace, objective: Objective, rng: np.random.Generator, cfg: SearchConfig, start: Genome | None = None
) -> ClimbResult:
    """Climb from `start` (or a random genome), restart at random until `patience` restarts bring nothing."""
    best, best_f = None, -math.inf
    path: list[Step] = []
    stale = 0
    for restart in range(cfg.max_restarts + 1):
        origin = start if (restart == 0 and start is not None) else random_genome(space, rng)
        steps = _climb_once(origin, space, objective, rng, cfg.move, restart)
        path += steps
        top = max(steps, key=lambda s: s.fitness)
        if top.fitness > best_f:
            best, best_f, stale = top.genome, top.fitness, 0
        else:
            stale += 1
        if objective.exhausted or stale >= cfg.patience:
            break
    return ClimbResult(best or path[0].genome, best_f, tuple(path))
